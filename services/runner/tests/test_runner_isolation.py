"""The runner states its sandbox's protections: logged at start-up, recorded in every
RunStarted, and with `require_full_isolation` it refuses to start on a host that falls short.

A gap is made honestly, not by faking the probe: a run uid of 0 (`run_uid_base=0`) asks for
runs as root, which the sandbox reports as the "user" protection being off.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.execution.bubblewrap import host_protections, isolation_gaps
from groundloop.execution.cgroup_memory import memory_cgroup_error
from groundloop.execution.environment import Environment
from groundloop.manifest import Resources
from groundloop.runner.execute import run_limits
from groundloop.runner.slots import RunnerSettings, Slot
from groundloop.settings import Settings
from tests.runner_support import (
    Collector,
    patch_event,
    publish_patch,
    serving,
    settings_environment,
)

pytestmark = pytest.mark.timeout(90)

GIB = 1024**3


async def _one_run(settings: Settings, search_id: str, **runner: object) -> Collector:
    env = Environment.load("synthetic", settings.environments_dir)
    bus = await Bus.connect(settings, "test")
    seen = await Collector().start(bus, search_id)
    async with serving(settings, slots=1, **runner):
        await publish_patch(bus, env, patch_event(env, search_id, 0))
        await seen.wait(lambda c: c.of(ev.RunCompleted))
    await bus.close()
    return seen


async def test_run_started_records_the_hosts_protections(env_settings: Settings):
    seen = await _one_run(env_settings, "prot", run_uid_base=7000)
    [started], [done] = seen.of(ev.RunStarted), seen.of(ev.RunCompleted)
    assert done.status == "succeeded", done
    assert started.isolation == host_protections(7000)
    assert {"sandbox", "user", "namespaces", "filesystem", "resident_memory"} <= set(
        started.isolation
    )
    # What the run got agrees with what its RunStarted promised.
    for name in ("sandbox", "capabilities", "namespaces", "filesystem"):
        assert done.provenance.isolation[name] == started.isolation[name], name


async def test_a_runner_with_a_gap_warns_and_records_it(env_settings: Settings, caplog):
    caplog.set_level(logging.INFO, logger="groundloop.runner")
    seen = await _one_run(env_settings, "gap", run_uid_base=0)
    [started], [done] = seen.of(ev.RunStarted), seen.of(ev.RunCompleted)
    assert done.status == "succeeded", done
    assert started.isolation["user"].startswith("off: run_uid 0"), started.isolation
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("NOT fully isolated" in w and "user: run_uid 0" in w for w in warnings), warnings
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("sandbox protections for runs as uid 0" in m for m in infos), infos


def test_require_full_isolation_refuses_to_start_on_a_host_with_a_gap(env_settings: Settings):
    environ = {**settings_environment(env_settings), "GROUNDLOOP_RUNNER_RUNNER_ID": "strict"}
    flags = ["--require-full-isolation", "--run-uid-base", "0", "--slots", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "groundloop.runner", *flags],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0, done.stderr
    assert "runner strict refuses to start" in done.stderr, done.stderr
    assert "full isolation is required" in done.stderr and "user: run_uid 0" in done.stderr


async def test_require_full_isolation_serves_where_every_protection_holds(
    env_settings: Settings,
):
    if gaps := isolation_gaps(host_protections()):
        pytest.skip(f"this host lacks full isolation: {gaps}")
    seen = await _one_run(env_settings, "strict", require_full_isolation=True)
    [started], [done] = seen.of(ev.RunStarted), seen.of(ev.RunCompleted)
    assert done.status == "succeeded", done
    assert not isolation_gaps(started.isolation)


async def test_a_cpu_run_records_its_resident_memory_limit(env_settings: Settings):
    seen = await _one_run(env_settings, "resident")
    [done] = seen.of(ev.RunCompleted)
    assert done.status == "succeeded", done
    limit = int(
        Environment.load("synthetic", env_settings.environments_dir).manifest.resources.memory_gb
        * GIB
    )
    isolation = done.provenance.isolation
    if memory_cgroup_error() is None:
        assert isolation["resident_memory"].startswith(f"resident <= {limit} bytes"), isolation
    else:
        assert isolation["resident_memory"].startswith("off:"), isolation
    assert isolation["memory"] == f"RLIMIT_AS={int(limit * 3.0)}", isolation


def test_every_slot_gets_a_resident_limit_and_only_cpu_slots_an_address_space_limit():
    resources = Resources(memory_gb=2)
    gpu = RunnerSettings(resource_class="gpu1", gpus=["0", "1"], run_uid_base=5000)
    on_gpu = run_limits(gpu, Slot(1, ("1",)), resources)
    assert on_gpu.resident_memory_bytes == 2 * GIB and on_gpu.memory_bytes is None
    assert on_gpu.run_uid == 5001 and on_gpu.isolate and not on_gpu.require_full_isolation
    cpu = RunnerSettings(slots=2, require_full_isolation=True)
    on_cpu = run_limits(cpu, Slot(0), resources)
    assert on_cpu.resident_memory_bytes == 2 * GIB and on_cpu.memory_bytes == 6 * GIB
    assert on_cpu.run_uid == 65534 and on_cpu.require_full_isolation


def test_a_v1_run_started_is_read_as_v2_without_protections():
    payload = json.loads(
        ev.encode(
            ev.RunStarted(
                search_id="old",
                producer="runner",
                run_id="r",
                runner_id="a",
                host="h",
                seed=0,
                isolation={"sandbox": "bubblewrap"},
            )
        )
    )
    old = {**payload, "version": 1}
    del old["isolation"]
    lifted = ev.decode(json.dumps(old))
    assert isinstance(lifted, ev.RunStarted) and lifted.version == 2 and lifted.isolation == {}
