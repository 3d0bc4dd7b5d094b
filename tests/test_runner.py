"""The runner service against a real nats-server, real subprocesses and the synthetic environment.

Runaway runs use a copy of `environments/synthetic` whose manifest has a short budget (the
budget always comes from the manifest, never from the patch); the runaway code itself is the
patch: `config.py` is imported by the protected run.py, so code appended to it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.execution.applier import make_diff
from groundloop.bus import Bus
from groundloop.consumer import Delivery
from groundloop.execution.environment import Environment
from groundloop.runner.containers import ContainerRun, backend_for
from groundloop.runner.logs import read_log
from groundloop.runner.service import RunnerDeps, exhausted_handler, handle, run, run_spec
from groundloop.runner.slots import RunnerSettings, SlotPool, plan_slots
from groundloop.settings import Settings
from tests.paths import REPO_ROOT

pytestmark = pytest.mark.timeout(90)

SYNTHETIC = REPO_ROOT / "environments" / "synthetic"


# ---------------------------------------------------------------------------- helpers


def make_environments(
    root: Path,
    *,
    wall: float = 60,
    grace: float = 1.0,
    memory_gb: float = 0.5,
    symlink_to: Path | None = None,
) -> Path:
    """A copy of the synthetic environment with its own budget (and an optional symlink
    `escape` pointing outside, which a patch may try to write through)."""
    target = root / "synthetic"
    shutil.copytree(SYNTHETIC, target, ignore=shutil.ignore_patterns("__pycache__", "out"))
    manifest = (target / "manifest.toml").read_text()
    manifest = re.sub(r"(?m)^wall_seconds = .*$", f"wall_seconds = {wall}", manifest)
    manifest = re.sub(r"(?m)^grace_seconds = .*$", f"grace_seconds = {grace}", manifest)
    manifest = re.sub(r"(?m)^memory_gb = .*$", f"memory_gb = {memory_gb}", manifest)
    if symlink_to is not None:
        (target / "escape").symlink_to(symlink_to, target_is_directory=True)
        manifest = manifest.replace("new_files = []", 'new_files = ["escape/*.py"]')
    (target / "manifest.toml").write_text(manifest)
    return root


def patch_event(
    env: Environment,
    search_id: str,
    index: int,
    *,
    sleep: float = 0.0,
    code: str = "",
    diff: str | None = None,
    seed: int = 0,
) -> ev.PatchReady:
    if diff is None:
        before = env.editable_sources()
        config = re.sub(
            r"(?m)^SLEEP_SECONDS = .*$", f"SLEEP_SECONDS = {sleep}", before["config.py"]
        )
        diff = make_diff(before, {**before, "config.py": config + code})
    return ev.PatchReady(
        event_id=ev.stable_id(search_id, "patch-event", index),
        search_id=search_id,
        producer="implementer",
        patch_id=ev.stable_id(search_id, "patch", index),
        idea_id=ev.stable_id(search_id, "idea", index),
        generation=0,
        environment=env.name,
        environment_digest=env.digest(),
        diff=diff,
        diff_digest="0" * 64,
        patched_digest="0" * 64,
        files_changed=["config.py"],
        implementer=ev.ImplementerInfo(kind="knobs"),
        preflight=ev.PreflightReport(passed=True),
        seed=seed,
    )


def record_pids(pid_dir: Path) -> str:
    """Patch code: every process of the run appends its pid under pid_dir."""
    return (
        f"\nimport os as _os\nopen({str(pid_dir / 'pids')!r}, 'a').write(f'{{_os.getpid()}}\\n')\n"
    )


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its exit status is left


class Collector:
    """Every event of one search as it is published (a core subscription on the stream's
    subjects), with `wait(predicate)` instead of sleeps."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []
        self._changed = asyncio.Condition()

    async def start(self, bus: Bus, search_id: str) -> Collector:
        async def on_msg(msg) -> None:
            self.events.append(ev.decode(msg.data))
            async with self._changed:
                self._changed.notify_all()

        self._sub = await bus.nc.subscribe(bus.subject_filter(search_id=search_id), cb=on_msg)
        return self

    def of(self, kind: type[ev.Event]) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    async def wait(self, predicate: Callable[[Collector], bool], timeout: float = 30) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self)), timeout)


@contextlib.asynccontextmanager
async def serving(settings: Settings, **runner: object) -> AsyncIterator[asyncio.Event]:
    """One runner replica as an asyncio task of this process; yields its stop event."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, RunnerSettings(**runner), stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def settings_environment(settings: Settings) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("GROUNDLOOP_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            out[f"GROUNDLOOP_{name.upper()}"] = str(value)
    return out


async def replay(settings: Settings, search_id: str) -> list[ev.Event]:
    bus = await Bus.connect(settings, "test-replay")
    try:
        return [e async for e in bus.events(search_id)]
    finally:
        await bus.close()


@pytest.fixture
def envs(tmp_path: Path) -> Path:
    return make_environments(tmp_path / "envs", wall=60)


@pytest.fixture
def env_settings(settings: Settings, envs: Path) -> Settings:
    return settings.model_copy(update={"environments_dir": envs})


# ---------------------------------------------------------------------------- without a broker


def test_slots_split_gpus_into_disjoint_sets(monkeypatch):
    four = RunnerSettings(resource_class="gpu1", gpus="0,1,2,3", gpus_per_run=1)
    assert [s.cuda_visible_devices for s in plan_slots(four)] == ["0", "1", "2", "3"]
    pairs = RunnerSettings(resource_class="gpu8", gpus="0,1,2,3,4", gpus_per_run=2)
    assert [s.devices for s in plan_slots(pairs)] == [("0", "1"), ("2", "3")]  # "4" left unused
    monkeypatch.setenv("GROUNDLOOP_RUNNER_GPUS", "4,5")  # what `python -m groundloop.runner` reads
    assert [s.devices for s in plan_slots(RunnerSettings(resource_class="gpu1"))] == [
        ("4",),
        ("5",),
    ]
    monkeypatch.delenv("GROUNDLOOP_RUNNER_GPUS")
    cpu = plan_slots(RunnerSettings(slots=3))
    assert len(cpu) == 3 and all(s.cuda_visible_devices == "" for s in cpu)
    with pytest.raises(ValueError, match="gpus-per-run"):
        RunnerSettings(resource_class="gpu8", gpus="0,1", gpus_per_run=8)
    with pytest.raises(ValueError, match="needs GPUs"):
        RunnerSettings(resource_class="gpu1")


def test_container_commands_isolate_the_run():
    run = ContainerRun(
        image="ghcr.io/x/run:1",
        workspace=Path("/data/ws"),
        mounts=(Path("/data/run"),),
        devices=("2", "3"),
        memory_bytes=8 << 30,
        max_processes=256,
        env={"GROUNDLOOP_SEED": "1", "CUDA_VISIBLE_DEVICES": "2,3"},
        name="run-1",
    )
    docker = backend_for("docker").command(run, ["python", "train.py"])
    assert docker[:2] == ["docker", "run"] and docker[-3:] == [
        "ghcr.io/x/run:1",
        "python",
        "train.py",
    ]
    flags = " ".join(docker)
    for expected in (
        "--network none",
        f"--memory {8 << 30}",
        "--pids-limit 256",
        '--gpus "device=2,3"',
        "--volume /data/ws:/data/ws:rw",
        "--volume /data/run:/data/run:rw",
        "--workdir /data/ws",
        "--env GROUNDLOOP_SEED=1",
        "--env CUDA_VISIBLE_DEVICES=0,1",
    ):
        assert expected in flags, expected
    podman = " ".join(backend_for("podman").command(run, ["python", "train.py"]))
    assert (
        "--device nvidia.com/gpu=2 --device nvidia.com/gpu=3" in podman and "--gpus" not in podman
    )
    apptainer = backend_for("apptainer").command(run, ["python", "train.py"])
    flags = " ".join(apptainer)
    assert apptainer[:2] == ["apptainer", "exec"] and "--containall --cleanenv" in flags
    for expected in (
        "--net --network none",
        "--nv",
        "--bind /data/ws:/data/ws:rw",
        "--pwd /data/ws",
        "--env CUDA_VISIBLE_DEVICES=2,3",
        "--pids-limit 256",
    ):
        assert expected in flags, expected
    online = " ".join(
        backend_for("docker").command(ContainerRun("img", Path("/w"), network=True), ["x"])
    )
    assert "--network" not in online and "--gpus" not in online
    assert backend_for("local") is None
    with pytest.raises(ValueError, match="unknown container backend"):
        backend_for("lxc")


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


# ---------------------------------------------------------------------------- with a broker


async def test_a_patch_runs_and_its_log_is_in_the_object_store(env_settings: Settings):
    env = Environment.load("synthetic", env_settings.environments_dir)
    bus = await Bus.connect(env_settings, "test")
    seen = await Collector().start(bus, "ok")
    async with serving(env_settings, slots=1, runner_id="r1"):
        await bus.publish(patch_event(env, "ok", 0))
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
        await bus.publish(patch_event(env, "env", 0, code=code))
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
    pid_dirs = {}
    async with serving(env_settings, slots=3, max_processes=24):
        for index, (name, (code, _)) in enumerate(RUNAWAYS.items()):
            pid_dirs[name] = tmp_path / name
            pid_dirs[name].mkdir()
            record = record_pids(pid_dirs[name])
            # `record` at the top: the run's main process; inside the code: the daemon.
            body = record + code.replace(
                "{record}", record.strip().replace("\n", "\n        ") + "\n"
            )
            await bus.publish(patch_event(env, "runaway", index, code=body))
        await seen.wait(lambda c: len(c.of(ev.RunCompleted)) == len(RUNAWAYS), timeout=40)
        # The runner keeps serving: a normal run after the runaways succeeds.
        await bus.publish(patch_event(env, "runaway", 99))
        await seen.wait(lambda c: len(c.of(ev.RunCompleted)) == len(RUNAWAYS) + 1)
    by_patch = {e.patch_id: e for e in seen.of(ev.RunCompleted)}
    for index, (name, (_, expected)) in enumerate(RUNAWAYS.items()):
        done = by_patch[ev.stable_id("runaway", "patch", index)]
        assert done.status in ((expected,) if isinstance(expected, str) else expected), (name, done)
        assert done.wall_seconds < wall + grace + 3, (name, done.wall_seconds)
        pids = [int(p) for p in (pid_dirs[name] / "pids").read_text().split()]
        assert pids and not [p for p in pids if alive(p)], f"{name}: processes {pids} survive"
    assert by_patch[ev.stable_id("runaway", "patch", 99)].status == "succeeded"
    hog = by_patch[ev.stable_id("runaway", "patch", 2)]
    assert "memory" in hog.reason or "MemoryError" in (hog.error_tail or ""), hog
    await bus.close()


async def test_two_replicas_with_three_slots_drain_thirty_runs(env_settings: Settings):
    env = Environment.load("synthetic", env_settings.environments_dir)
    bus = await Bus.connect(env_settings, "test")
    seen = await Collector().start(bus, "drain")
    for index in range(30):
        await bus.publish(patch_event(env, "drain", index))
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
    try:
        pid_dir = tmp_path / "pids"
        pid_dir.mkdir()
        await bus.publish(patch_event(env, "kill", 0, sleep=3.0, code=record_pids(pid_dir)))
        await seen.wait(lambda c: c.of(ev.RunStarted), timeout=30)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    async with serving(env_settings, slots=1, runner_id="survivor"):
        await seen.wait(lambda c: c.of(ev.RunCompleted), timeout=40)
    [first_pid] = [int(p) for p in (pid_dir / "pids").read_text().split()][:1]
    assert not alive(first_pid), "the killed runner's run must not outlive it"
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
    await bus.publish(patch_event(env, "term", 0, sleep=4.0))
    await bus.publish(patch_event(env, "term", 1, sleep=0.0))
    await seen.wait(lambda c: c.of(ev.RunStarted))
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
