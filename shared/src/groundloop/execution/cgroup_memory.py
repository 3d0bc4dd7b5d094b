"""Resident-memory limits for sandboxed runs: the memory cgroup, v2 or v1.

RLIMIT_AS caps address space, which CUDA reserves by the terabyte, so GPU runs cannot use it
and a GPU run could take all host memory. The memory cgroup counts what a run actually holds
(resident pages, page cache it dirties, its private /tmp on tmpfs) and the kernel's OOM killer
stops the run, not the host, when it goes over. One cgroup per run, joined between fork and
exec like the containment cgroup (`groundloop.execution.process_tree`), so every descendant is
charged.

- cgroup v2: `memory.max` (and `memory.swap.max` = 0) in a child of this process's cgroup,
  where the parent delegates the memory controller;
- cgroup v1: `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes` where swap accounting
  is on) in the v1 memory hierarchy, under this process's own memory cgroup.

`memory_cgroup_error()` says why neither is usable (None when one is); the sandbox records it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import uuid
from pathlib import Path

from groundloop.execution import cgroup_pool
from groundloop.execution.process_tree import _mount_points, _remove_cgroup


def _own_cgroups() -> dict[str, str]:
    own: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path.lstrip("/")
    return own


def _usable(parent: Path, limit_file: str) -> bool:
    """Whether a run cgroup made under `parent` gets `limit_file` and accepts a value."""
    probe = parent / f"probe-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir(exist_ok=True)
        probe.mkdir()
        (probe / limit_file).write_text(str(1 << 40))
        return True
    except OSError:
        return False
    finally:
        _remove_cgroup(probe)


@functools.cache
def _memory_parent() -> tuple[str, Path] | tuple[None, str]:
    """("v2"|"v1", directory run cgroups go in), or (None, why there is none)."""
    own = _own_cgroups()
    for mount, _ in _mount_points("cgroup2"):
        base = mount / own.get("", "")
        parent = base / "groundloop"
        with contextlib.suppress(OSError):
            parent.mkdir(exist_ok=True)
            if "memory" not in (parent / "cgroup.controllers").read_text().split():
                continue
            with contextlib.suppress(OSError):
                (parent / "cgroup.subtree_control").write_text("+memory")
            if _usable(parent, "memory.max"):
                return "v2", parent
    for mount, options in _mount_points("cgroup"):
        if "memory" in options.split(","):
            parent = mount / own.get("memory", "") / "groundloop"
            if _usable(parent, "memory.limit_in_bytes"):
                return "v1", parent
    return None, (
        "no writable memory cgroup (cgroup v2 with the memory controller delegated to this "
        "process's cgroup, or a writable cgroup v1 memory hierarchy)"
    )


def memory_cgroup_error() -> str | None:
    """None when runs can get a resident-memory limit; else why not (cached)."""
    kind, where = _memory_parent()
    return None if kind else str(where)


def memory_parent() -> Path | None:
    """The directory run memory cgroups go in (None where there is none): swept like the
    containment cgroups when their owner has died."""
    kind, where = _memory_parent()
    return Path(where) if kind else None


class MemoryLimit:
    """One run's memory cgroup: `join_paths()` for the child, `limit_hit()`, `remove()`.
    `name` should be `run-<owner tag>-<token>` (sweepable, `sandbox.sweep_orphaned_runs`).
    An idle one of this process that had the same limit is reused (`cgroup_pool`)."""

    def __init__(self, name: str, limit_bytes: int) -> None:
        self.path: Path | None = None
        self.limit_bytes = limit_bytes
        self.kind, parent = _memory_parent()
        if self.kind is None:
            self.detail = f"not limited: {parent}"
            return
        if self.kind == "v2":
            self.detail = f"resident <= {limit_bytes} bytes (cgroup v2 memory.max)"
        else:
            self.detail = f"resident <= {limit_bytes} bytes (cgroup v1 memory.limit_in_bytes)"
        reused = cgroup_pool.take(Path(parent), limit_bytes)
        if reused is not None:
            try:  # written again: a run outside bwrap, as root, could have changed it
                self._write_limit(reused, limit_bytes)
                self.path = reused
                return
            except OSError:
                _discard(reused)
        path = Path(parent) / name
        try:
            path.mkdir()
            self._write_limit(path, limit_bytes)
            self.path = path
        except OSError as exc:
            _remove_cgroup(path)
            self.detail = f"not limited: cannot make memory cgroup {path}: {exc}"

    def _write_limit(self, path: Path, limit_bytes: int) -> None:
        if self.kind == "v2":
            (path / "memory.max").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):  # swapping out would dodge the limit
                (path / "memory.swap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):  # exists only with swap accounting
                (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))

    def join_paths(self) -> list[str]:
        return [str(self.path / "cgroup.procs")] if self.path is not None else []

    def limit_hit(self) -> str | None:
        if self.path is None:
            return None
        with contextlib.suppress(OSError):
            if self.kind == "v2":
                text = (self.path / "memory.events").read_text()
            else:
                text = (self.path / "memory.oom_control").read_text()
            match = re.search(r"^oom_kill (\d+)", text, re.M)
            if match and int(match.group(1)) > 0:
                return f"memory (resident limit; OOM killer stopped {match.group(1)} process(es))"
        return None

    def remove(self, reusable: bool = False) -> None:
        """Remove the cgroup, or keep it for a later run of this process when `reusable`
        (the run ended clean and hit no limit): reuse spares the reclaim below."""
        if self.path is not None:
            path, self.path = self.path, None
            cgroup_pool.give_back(path, self.limit_bytes, reusable=reusable, remove=_discard)


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):  # v1 keeps charging page cache to an empty group
        (path / "memory.force_empty").write_text("0")
    _remove_cgroup(path)
