"""Support for the runner's tests: environments with a short budget, patches whose code runs
inside the run (config.py is imported by the protected run.py), a collector that waits on
published events, and a runner replica as a task of the test's process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from groundloop import events as ev
from groundloop.bus import Bus, Published
from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment
from groundloop.execution.sandbox import MARKER
from groundloop.runner.service import run
from groundloop.runner.slots import RunnerSettings
from groundloop.settings import Settings
from tests import factories
from tests.paths import REPO_ROOT

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
    return factories.patch_for(
        search_id,
        index,
        environment=env.name,
        environment_digest=env.digest(),
        diff=diff,
        seed=seed,
    )


async def publish_patch(bus: Bus, env: Environment, patch: ev.PatchReady) -> Published:
    """Publish `patch` after the log prefix a runner requires of it (groundloop.search_index):
    its search's SearchStarted and the IdeaProposed of its idea. Both have stable ids, so
    publishing several patches of one search stores each prefix event once."""
    await bus.publish(factories.search_started_in(env, patch.search_id))
    idea = factories.idea_proposed(
        patch.search_id, idea_id=patch.idea_id, knobs={"SLEEP_SECONDS": 0.0}
    ).model_copy(update={"event_id": ev.stable_id(patch.idea_id, "proposed")})
    await bus.publish(idea)
    return await bus.publish(patch)


def record_start(name: str) -> str:
    """Patch code: the process running it appends `name` to `started` in its working
    directory, the run's workspace (the only place a sandboxed run may write that a test
    reads back, with keep_workspaces). Pids are not recorded: inside the run's pid namespace
    they are not the host's; `run_processes` finds the host's."""
    return f"\nopen('started', 'a').write({name + chr(10)!r})\n"


def run_processes(root: Path) -> set[int]:
    """Host pids of live processes of sandboxed runs under `root` (a runner's data dir or one
    runner's part of it): processes carrying the sandbox's run marker in their environment
    whose HOME, cache or working directory lies under `root`, so that runs of other tests
    and sessions are left out."""
    found = set()
    needle = str(root.resolve()).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry.name}/environ").read_bytes()
            if MARKER.encode() not in environ or not alive(int(entry.name)):
                continue
            cwd = os.readlink(f"/proc/{entry.name}/cwd").encode()
        except OSError:
            continue
        if needle in environ or cwd.startswith(needle):
            found.add(int(entry.name))
    return found


class ProcessWatch:
    """Every host pid `run_processes(root)` reports while the watch runs (sampled every
    50 ms in a thread): the processes a test later checks are gone."""

    def __init__(self, root: Path) -> None:
        self.root, self.seen = root, set[int]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.seen |= run_processes(self.root)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


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
