"""What a sandboxed run is allowed, and how that is put in force: `Limits` (what the caller
asks for), `rlimits` (the rlimits it turns into), `bwrap_wrapping` (the bubblewrap command
line for a run, its protections recorded) and `limit_from_exit` (which limit a failed run's
exit shows it hit). Used by `groundloop.execution.sandbox.run_sandboxed`, which re-exports
`Limits`.
"""

from __future__ import annotations

import logging
import re
import resource
import signal
from dataclasses import dataclass
from pathlib import Path

from groundloop.execution.bubblewrap import (
    DEFAULT_RUN_UID,
    Wrapped,
    bwrap_error,
    hand_over,
    host_protections,
    isolation_gaps,
    wrap,
)

# Logs under the sandbox's name: one component to operators.
log = logging.getLogger("groundloop.execution.sandbox")


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = None  # RLIMIT_AS (leave None for CUDA runs: it reserves VA)
    max_processes: int | None = None
    file_size_bytes: int | None = None
    open_files: int | None = None
    # Resident memory, by the memory cgroup: fits CPU and GPU runs alike.
    resident_memory_bytes: int | None = None
    # bubblewrap namespaces (groundloop.execution.bubblewrap). The run protocol (execute,
    # prepare, pre-flight) turns None into True; a bare run_sandboxed call with None runs a
    # plain process group in the runner's view (the low-level API; its pid-level tests).
    isolate: bool | None = None
    run_uid: int | None = DEFAULT_RUN_UID  # the uid a root runner's runs get (one per slot)
    # Refuse to start (IsolationUnavailable) unless every protection is in force on this host.
    require_full_isolation: bool = False


def rlimits(limits: Limits) -> list[tuple[int, int]]:
    """The rlimits `limits` asks for (the child always gets RLIMIT_CORE=0 on top)."""
    rlimits: list[tuple[int, int]] = []
    if limits.memory_bytes is not None:
        rlimits.append((resource.RLIMIT_AS, limits.memory_bytes))
    if limits.max_processes is not None:
        rlimits.append((resource.RLIMIT_NPROC, limits.max_processes))
    if limits.file_size_bytes is not None:
        rlimits.append((resource.RLIMIT_FSIZE, limits.file_size_bytes))
    if limits.open_files is not None:
        rlimits.append((resource.RLIMIT_NOFILE, limits.open_files))
    return rlimits


def bwrap_wrapping(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str],
    writable: list[Path] | tuple[Path, ...],
    readable: list[Path] | tuple[Path, ...],
    network: bool,
    limits: Limits,
    isolation: dict[str, str],
) -> Wrapped | None:
    """The bwrap wrapping of `cmd` (None without it), its protections in `isolation`."""
    for name, value in host_protections(limits.run_uid).items():
        isolation.setdefault(name, value)
    if not limits.isolate:
        isolation["sandbox"] = f"off: isolate={limits.isolate} chosen by the caller"
        for name in ("user", "capabilities", "namespaces", "filesystem"):
            isolation[name] = "off: not sandboxed by bwrap"
    if not limits.isolate or bwrap_error(limits.run_uid):
        if limits.isolate:
            log.warning("sandbox: running without bwrap: %s", "; ".join(isolation_gaps(isolation)))
        return None
    own = [env.get("HOME"), env.get("GROUNDLOOP_CACHE_DIR")]
    if env.get("GROUNDLOOP_METRICS_OUT"):
        own.append(str(Path(env["GROUNDLOOP_METRICS_OUT"]).parent))
    rw = [*writable, *(Path(p) for p in own if p and Path(p).is_dir())]
    wrapped = wrap(cmd, cwd=cwd, writable=rw, readable=readable, network=network,
                   run_uid=limits.run_uid)  # fmt: skip
    if wrapped.uid is not None:  # a real uid outside: give it the places it may write
        hand_over(rw, wrapped.uid, recursive=[cwd])
    if wrapped.user:
        isolation["user"] = wrapped.user
    return wrapped


def limit_from_exit(returncode: int | None, tail: bytes) -> str | None:
    # Python ignores SIGXFSZ, so there the write fails with EFBIG instead of a signal.
    if returncode == -signal.SIGXFSZ or (returncode and b"File too large" in tail[-4000:]):
        return "file_size (RLIMIT_FSIZE)"
    if returncode not in (0, None) and re.search(
        rb"MemoryError|Cannot allocate memory|std::bad_alloc|out of memory", tail[-4000:]
    ):
        return "memory (allocation refused)"
    if returncode not in (0, None) and re.search(rb"Too many open files", tail[-4000:]):
        return "open_files (RLIMIT_NOFILE)"
    return None
