"""The runner service against a real nats-server, real subprocesses and the synthetic environment.

Runaway runs use a copy of `environments/synthetic` whose manifest has a short budget (the
budget always comes from the manifest, never from the patch); the runaway code itself is the
patch: `config.py` is imported by the protected run.py, so code appended to it runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.execution.environment import Environment
from groundloop.runner.logs import read_log
from groundloop.settings import Settings
from tests.runner_support import (
    Collector,
    ProcessWatch,
    alive,
    make_environments,
    patch_event,
    publish_patch,
    record_start,
    run_processes,
    serving,
)

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------------------- with a broker


async def test_a_patch_runs_and_its_log_is_in_the_object_store(env_settings: Settings):
    env = Environment.load("synthetic", env_settings.environments_dir)
    bus = await Bus.connect(env_settings, "test")
    seen = await Collector().start(bus, "ok")
    async with serving(env_settings, slots=1, runner_id="r1"):
        await publish_patch(bus, env, patch_event(env, "ok", 0))
        await seen.wait(lambda c: c.of(ev.RunCompleted))
    [started], [done] = seen.of(ev.RunStarted), seen.of(ev.RunCompleted)
    assert done.status == "succeeded", done
    assert done.run_id == started.run_id == ev.stable_id(started.patch_id, 0)
    assert (
        0.5 < done.score < 0.7 and done.reward == done.score and done.metrics["score"] == done.score
    )
    assert done.provenance.environment_digest == env.digest()
    assert done.provenance.isolation["network"].startswith("none")
    text = (await read_log(bus.get_artifact, done.log_key)).decode()
    assert "seed=0 split=val" in text
    await bus.close()


async def test_a_run_never_sees_the_runners_secrets(env_settings: Settings, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai-123")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-456")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-789")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    env = Environment.load("synthetic", env_settings.environments_dir)
    bus = await Bus.connect(env_settings, "test")
    seen = await Collector().start(bus, "env")
    code = (
        "\nimport os as _os\nfor _k, _v in sorted(_os.environ.items()): print(f'ENV {_k}={_v}')\n"
    )
    async with serving(env_settings, slots=1):
        await publish_patch(bus, env, patch_event(env, "env", 0, code=code))
        await seen.wait(lambda c: c.of(ev.RunCompleted))
    [done] = seen.of(ev.RunCompleted)
    assert done.status == "succeeded", done
    text = (await read_log(bus.get_artifact, done.log_key)).decode()
    names = set(re.findall(r"(?m)^ENV ([^=]+)=", text))
    assert {"GROUNDLOOP_SEED", "GROUNDLOOP_METRICS_OUT", "PATH", "HOME"} <= names
    for secret in (
        "sk-test-openai-123",
        "sk-ant-test-456",
        "aws-secret-789",
        "hf_test_token",
        env_settings.nats_url,
    ):
        assert secret not in text
    assert (
        not {
            "OPENAI_API_KEY",
            "ANTHROPIC_API_KEY",
            "AWS_SECRET_ACCESS_KEY",
            "HF_TOKEN",
            "GROUNDLOOP_NATS_URL",
            "GROUNDLOOP_DATA_DIR",
        }
        & names
    )
    await bus.close()


RUNAWAYS = {
    "infinite_loop": ("\nwhile True:\n    pass\n", "timed_out"),
    "fork_bomb": (
        "\nimport os as _o\nwhile True:\n    try:\n        _o.fork()\n    except OSError:\n        pass\n",
        ("timed_out", "killed"),
    ),
    "memory_hog": (
        "\n_hog = [bytes(2**30) for _ in range(64)]\n",
        "failed",
    ),  # calloc: no page touched
    "ignores_sigterm": (
        "\nimport signal as _s, time as _t\n_s.signal(_s.SIGTERM, _s.SIG_IGN)\n"
        "while True:\n    _t.sleep(0.1)\n",
        "timed_out",
    ),
    "daemonising_grandchild": (
        "\nimport os as _o, time as _t, signal as _s\nif _o.fork() == 0:\n    _o.setsid()\n"
        "    if _o.fork() == 0:\n        _s.signal(_s.SIGTERM, _s.SIG_IGN)\n" + "        {record}"
        "        _t.sleep(600)\n    _o._exit(0)\n_t.sleep(0.3)\n",
        "succeeded",
    ),
}


async def test_runaway_code_ends_within_budget_and_leaves_no_process(
    settings: Settings, tmp_path: Path
):
    wall, grace = 1.5, 0.5
    envs = make_environments(tmp_path / "envs", wall=wall, grace=grace, memory_gb=0.5)
    env_settings = settings.model_copy(update={"environments_dir": envs})
    env = Environment.load("synthetic", envs)
    bus = await Bus.connect(env_settings, "test")
    seen = await Collector().start(bus, "runaway")
    served = dict(slots=3, max_processes=24, runner_id="r", keep_workspaces=True)
    with ProcessWatch(env_settings.data_dir) as watch:
        async with serving(env_settings, **served):
            for index, (code, _) in enumerate(RUNAWAYS.values()):
                # At the top: the run's main process; inside the code: the daemon.
                body = record_start("main") + code.replace(
                    "{record}", record_start("daemon").strip() + "\n"
                )
                await publish_patch(bus, env, patch_event(env, "runaway", index, code=body))
            await seen.wait(lambda c: len(c.of(ev.RunCompleted)) == len(RUNAWAYS), timeout=40)
            # The runner keeps serving: a normal run after the runaways succeeds.
            await publish_patch(bus, env, patch_event(env, "runaway", 99))
            await seen.wait(lambda c: len(c.of(ev.RunCompleted)) == len(RUNAWAYS) + 1)
    assert watch.seen, "the runs' processes were never seen: run_processes finds nothing"
    by_patch = {e.patch_id: e for e in seen.of(ev.RunCompleted)}
    for index, (name, (code, expected)) in enumerate(RUNAWAYS.items()):
        done = by_patch[ev.stable_id("runaway", "patch", index)]
        assert done.status in ((expected,) if isinstance(expected, str) else expected), (name, done)
        assert done.wall_seconds < wall + grace + 3, (name, done.wall_seconds)
        [workspace] = env_settings.data_dir.glob(f"runner/r/{done.run_id}/attempt-*/workspace")
        started = (workspace / "started").read_text().split()
        assert "main" in started and ("daemon" in started) == ("{record}" in code), (name, started)
    survivors = [p for p in watch.seen if alive(p)] + sorted(run_processes(env_settings.data_dir))
    assert not survivors, f"processes of the runs survive: {survivors}"
    assert by_patch[ev.stable_id("runaway", "patch", 99)].status == "succeeded"
    hog = by_patch[ev.stable_id("runaway", "patch", 2)]
    assert "memory" in hog.reason or "MemoryError" in (hog.error_tail or ""), hog
    await bus.close()
