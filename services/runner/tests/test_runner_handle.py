"""The runner's `handle` without a broker: escaping patches are never run, and a run out of
deliveries is recorded failed with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.consumer import Delivery
from groundloop.execution.environment import Environment
from groundloop.runner.service import RunnerDeps, exhausted_handler, handle, run_spec
from groundloop.runner.slots import RunnerSettings, SlotPool, plan_slots
from groundloop.settings import Settings
from tests.runner_support import (
    make_environments,
    patch_event,
)

pytestmark = pytest.mark.timeout(90)


async def local_deps(settings: Settings, **runner: object) -> tuple[RunnerDeps, list, dict]:
    published: list[ev.Event] = []
    artifacts: dict[str, bytes] = {}

    async def publish(event: ev.Event) -> None:
        published.append(event)

    async def put(key: str, data: bytes) -> str:
        artifacts[key] = data
        return key

    async def get(key: str) -> bytes:
        return artifacts[key]

    rs = RunnerSettings(**runner)
    return (
        RunnerDeps(settings, rs, SlotPool(plan_slots(rs)), publish, put, get),
        published,
        artifacts,
    )


async def test_escaping_patches_are_rejected_and_never_run(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    envs = make_environments(tmp_path / "envs", symlink_to=outside)
    settings = Settings(data_dir=tmp_path / "data", environments_dir=envs)
    env = Environment.load("synthetic", envs)
    deps, published, _ = await local_deps(settings)
    marker = tmp_path / "ran"
    body = f"+open({str(marker)!r}, 'w').write('ran')\n"
    diffs = {
        "dotdot": f"--- /dev/null\n+++ b/../evil.py\n@@ -0,0 +1 @@\n{body}",
        "absolute": f"--- /dev/null\n+++ {tmp_path}/evil.py\n@@ -0,0 +1 @@\n{body}",
        "symlink": f"--- /dev/null\n+++ b/escape/evil.py\n@@ -0,0 +1 @@\n{body}",
    }
    for index, (kind, diff) in enumerate(diffs.items()):
        event = patch_event(env, "esc", index, diff=diff)
        [done] = await handle(event, Delivery(event, 1, 5, 30.0), deps)
        assert done.status == "rejected", (kind, done)
        assert "patch rejected" in done.reason
    assert not published, "a rejected patch must not even emit RunStarted"
    assert (
        not marker.exists()
        and list(outside.iterdir()) == []
        and not (tmp_path / "evil.py").exists()
    )
    assert not (envs.parent / "evil.py").exists()


async def test_exhausted_run_is_recorded_failed_with_the_reason(tmp_path: Path):
    env = Environment.load("synthetic", make_environments(tmp_path))
    event = patch_event(env, "lost", 0)
    [done] = await exhausted_handler(4)(event, "no runner-cpu finished it in 4 deliveries")
    assert done.status == "failed" and done.run_id == run_spec(event).run_id
    assert "runner lost on every one of 4 deliveries" in done.reason
