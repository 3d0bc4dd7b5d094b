"""Runner replicas on a real nats-server: slots drain a queue, a SIGKILLed replica's run is
completed by another, SIGTERM hands back a run that outlasts the grace.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.execution.environment import Environment
from groundloop.runner.service import run
from groundloop.runner.slots import RunnerSettings
from groundloop.settings import Settings
from tests.runner_support import (
    Collector,
    alive,
    patch_event,
    publish_patch,
    replay,
    run_processes,
    serving,
    settings_environment,
)
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(90)


async def test_two_replicas_with_three_slots_drain_thirty_runs(env_settings: Settings):
    env = Environment.load("synthetic", env_settings.environments_dir)
    bus = await Bus.connect(env_settings, "test")
    seen = await Collector().start(bus, "drain")
    for index in range(30):
        await publish_patch(bus, env, patch_event(env, "drain", index))
    async with (
        serving(env_settings, slots=3, runner_id="a"),
        serving(env_settings, slots=3, runner_id="b"),
    ):
        await seen.wait(lambda c: len(c.of(ev.RunCompleted)) >= 30, timeout=60)
    stored = [e for e in await replay(env_settings, "drain") if isinstance(e, ev.RunCompleted)]
    assert len(stored) == 30 and len({e.run_id for e in stored}) == 30
    assert all(e.status == "succeeded" for e in stored)
    assert {e.runner_id for e in seen.of(ev.RunStarted)} == {"a", "b"}
    await bus.close()


async def test_sigkilled_runner_run_is_completed_by_another_replica(
    env_settings: Settings, tmp_path: Path
):
    env = Environment.load("synthetic", env_settings.environments_dir)
    bus = await Bus.connect(env_settings, "test")
    seen = await Collector().start(bus, "kill")
    environ = {
        **settings_environment(env_settings),
        "GROUNDLOOP_RUNNER_RUNNER_ID": "doomed",
        "GROUNDLOOP_RUNNER_SLOTS": "1",
    }
    doomed = subprocess.Popen([sys.executable, "-m", "groundloop.runner"], env=environ)
    doomed_runs = env_settings.data_dir / "runner" / "doomed"
    try:
        await publish_patch(bus, env, patch_event(env, "kill", 0, sleep=3.0))
        await seen.wait(lambda c: c.of(ev.RunStarted), timeout=30)
        orphans = await eventually(
            lambda: run_processes(doomed_runs), timeout=15, what="the doomed runner's run"
        )
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    async with serving(env_settings, slots=1, runner_id="survivor"):
        await seen.wait(lambda c: c.of(ev.RunCompleted), timeout=40)
    survivors = [p for p in orphans if alive(p)] + sorted(run_processes(doomed_runs))
    assert not survivors, f"the killed runner's run must not outlive it: {survivors}"
    stored = [e for e in await replay(env_settings, "kill") if isinstance(e, ev.RunCompleted)]
    assert len(stored) == 1 and stored[0].status == "succeeded"
    starts = seen.of(ev.RunStarted)
    assert [s.runner_id for s in starts] == ["doomed", "survivor"] and starts[1].attempt >= 2
    await bus.close()


async def test_sigterm_hands_back_a_run_that_outlasts_the_grace(env_settings: Settings):
    env = Environment.load("synthetic", env_settings.environments_dir)
    bus = await Bus.connect(env_settings, "test")
    seen = await Collector().start(bus, "term")
    stop = asyncio.Event()
    first = asyncio.create_task(
        run(env_settings, RunnerSettings(slots=1, runner_id="leaving", shutdown_grace_s=0.5), stop)
    )
    await publish_patch(bus, env, patch_event(env, "term", 0, sleep=4.0))
    await seen.wait(lambda c: c.of(ev.RunStarted))
    # Only now the short one, which the runner may take ahead (prefetch) and must hand back
    # unstarted: published together, under load it could get the slot first and finish.
    await publish_patch(bus, env, patch_event(env, "term", 1, sleep=0.0))
    await asyncio.sleep(0.3)
    stopped_at = time.monotonic()
    stop.set()  # what SIGTERM does in __main__
    await asyncio.wait_for(first, 20)
    assert time.monotonic() - stopped_at < 4.0, "the runner must not wait for the long run"
    assert not seen.of(ev.RunCompleted)
    async with serving(env_settings, slots=2, runner_id="next"):
        await seen.wait(lambda c: len(c.of(ev.RunCompleted)) == 2, timeout=40)
    assert {e.status for e in seen.of(ev.RunCompleted)} == {"succeeded"}
    assert [s.runner_id for s in seen.of(ev.RunStarted)].count("leaving") == 1
    await bus.close()
