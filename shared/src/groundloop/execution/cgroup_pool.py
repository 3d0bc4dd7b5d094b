"""Reuse a supervising process's run cgroups instead of making and removing them per run.

Making a run's cgroups (containment, v1 pids, memory: a mkdir and a limit written each) and
removing them (v1 memory first reclaims every page the run left charged, `memory.force_empty`,
so no dead memory cgroup lingers in the kernel) cost ~1.4 ms of the supervisor's CPU per run,
most of it in that reclaim. A cgroup is handed back here when its run ended clean: no process
left in it or below it (cgroup.events "populated 0" on v2, an empty cgroup.procs on v1), no
child cgroup (a directory's link count is 2 on cgroupfs exactly when it has none), and no limit
hit (so its event counters still read 0: a later run's "limit hit" is its own). The next run
asking for the same limit in the same parent takes it, and writes its limit again (a run
outside bwrap, as root, could have changed it). Anything else is removed as before.

Idle cgroups are named for their owner (`run-<pid>.<start time>-<token>`), so when the owner
dies the next sweep (`sandbox.sweep_orphaned_runs`) removes them like a dead runner's runs;
at a normal exit the owner removes them itself. The pool belongs to one process: a forked child
starts with an empty one and never touches its parent's.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Callable, Hashable
from pathlib import Path

MAX_IDLE = 64  # per (parent, limit); more idle than that are removed

_lock = threading.Lock()
_idle: dict[tuple[str, Hashable], list[tuple[Path, Callable[[Path], None]]]] = {}
_owner = [0]


def take(parent: Path, limit: Hashable) -> Path | None:
    """An idle cgroup of this process under `parent` already set to `limit`, or None."""
    with _lock:
        _own()
        idle = _idle.get((str(parent), limit))
        return idle.pop()[0] if idle else None


def give_back(
    path: Path, limit: Hashable, *, reusable: bool, remove: Callable[[Path], None]
) -> None:
    """Keep `path` for the next run asking for `limit` if `reusable` and it is clean, else
    `remove(path)` now. `remove` is also how it goes at exit."""
    if reusable and _clean(path):
        with _lock:
            _own()
            idle = _idle.setdefault((str(path.parent), limit), [])
            if len(idle) < MAX_IDLE:
                idle.append((path, remove))
                return
    remove(path)


def _clean(path: Path) -> bool:
    try:
        if os.stat(path).st_nlink != 2:  # a child cgroup: whatever made it, never reuse
            return False
        events = path / "cgroup.events"
        if events.exists():  # v2: the whole subtree; and not left frozen
            text = events.read_text()
            return "populated 0" in text and "frozen 1" not in text
        with open(path / "cgroup.procs", "rb") as procs:
            return not procs.read().strip()
    except OSError:
        return False


def _own() -> None:
    """Called under _lock: a forked child forgets its parent's idle cgroups (never removes)."""
    if _owner[0] != os.getpid():
        _owner[0] = os.getpid()
        _idle.clear()


@atexit.register
def _remove_idle() -> None:
    with _lock:
        if _owner[0] != os.getpid():
            return
        idle = [entry for entries in _idle.values() for entry in entries]
        _idle.clear()
    for path, remove in idle:
        with contextlib.suppress(OSError):
            remove(path)
