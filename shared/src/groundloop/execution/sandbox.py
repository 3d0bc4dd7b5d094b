"""Run untrusted code: least privilege, allow-listed environment, limits, hard budget.

`run_sandboxed(cmd, ...)` starts `cmd` in a new session/process group with an allow-listed
environment (`allowed_environment`, module `run_env`), rlimits (address space, processes,
file size, open files) and, with `Limits.resident_memory_bytes`, a memory cgroup that caps
resident memory (CPU and GPU runs alike; `cgroup_memory`). With `Limits.isolate` (the run
protocol's default: execute, prepare, pre-flight) it runs inside bubblewrap
(`groundloop.execution.bubblewrap`): an unprivileged uid, no capabilities, no_new_privs, its
own pid/mount/network/ipc/uts/cgroup/user namespaces, a read-only filesystem but for its
workspace, run dir, cache and a private /tmp. Without it (or without bwrap on the host) it
gets a network namespace when the OS allows it, and nothing else of the above: that is
recorded, and `Limits.require_full_isolation` refuses to run (IsolationUnavailable).

Output streams to a log file and a callback; a wall-clock budget ends in SIGTERM to every
process of the run, a grace period, then SIGKILL. Every process of the run is found and
killed at the end, including grandchildren that called setsid() or daemonised, by
containment "cgroup2" (a fresh cgroup per run, with a kernel process cap via `pids.max`)
or else "proc-scan" (a child subreaper scanning /proc for the run's processes); in bwrap its
pid namespace ends with its pid 1 as well. `groundloop.execution.process_tree`, the OS-level
half, and `groundloop.execution.sandbox_limits` (`Limits`, rlimits, the bwrap wrapping) are
kept apart so that this module (the public API and the supervising loop) reads in one sitting.

What was enforced, each protection not in force ("off: why"), and any limit that was hit
are recorded in `ProcessResult.isolation`, which the runner copies into the run's
provenance. Used by groundloop.execution.environment.execute.

Cost to the supervising process: runs are forked by a small launcher process
(`groundloop.execution.launcher`), never by this one; the supervising thread sleeps in one
poll() on the run's output, the leader's exit and a `Cancellation`, and wakes for nothing
else where the kernel caps the processes; a clean run's cgroups serve the next run
(`groundloop.execution.cgroup_pool`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from groundloop.execution.bubblewrap import (
    IsolationUnavailable,
    host_protections,
    isolation_gaps,
    require_full_isolation,
)
from groundloop.execution.cgroup_memory import MemoryLimit, memory_parent
from groundloop.execution.launcher import Launch, Spawned, spawn
from groundloop.execution.process_tree import CLONE_NEWNET as CLONE_NEWNET
from groundloop.execution.process_tree import MARKER as MARKER
from groundloop.execution.process_tree import PR_SET_CHILD_SUBREAPER as PR_SET_CHILD_SUBREAPER
from groundloop.execution.process_tree import PR_SET_PDEATHSIG as PR_SET_PDEATHSIG
from groundloop.execution.process_tree import (
    _cgroup_parents,
    _Containment,
    _kill_cgroup,
    _owner_tag,
    _start_time,
    network_isolation_error,
)
from groundloop.execution.run_env import RUN_VARIABLES as RUN_VARIABLES
from groundloop.execution.run_env import allowed_environment as allowed_environment
from groundloop.execution.run_output import TAIL_BYTES as TAIL_BYTES
from groundloop.execution.run_output import RunOutput
from groundloop.execution.sandbox_limits import Limits as Limits
from groundloop.execution.sandbox_limits import bwrap_wrapping, limit_from_exit, rlimits

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05  # only where no fd can tell: no pidfd for the leader; the grace period
WATCH_SECONDS = 0.2  # process-cap / containment sweep period (when the kernel does neither)
CANCEL_POLL_SECONDS = 0.1  # a plain threading.Event given to cancel_on cannot wake a run
# Set by `cancel_on`; read by run_sandboxed (asyncio.to_thread copies it into the worker).
_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "sandbox_cancel", default=None
)


@dataclass
class ProcessResult:
    returncode: int | None
    status: Literal["exited", "timed_out", "killed"]
    wall_seconds: float
    output_tail: str
    isolation: dict[str, str] = field(default_factory=dict)


class Cancellation(threading.Event):
    """A threading.Event that wakes the runs watching it (`cancel_on`) the moment it is set:
    they wait on its eventfd with their output, instead of looking at the flag now and then
    as they must for a plain Event."""

    def __init__(self) -> None:
        super().__init__()
        self._fd: int | None = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        assert self._fd is not None
        return self._fd

    def set(self) -> None:
        super().set()
        if self._fd is not None:
            os.eventfd_write(self._fd, 1)  # readable from now on: never read back

    def __del__(self) -> None:  # closed with its last user: a run may wait on it until then
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]
            self._fd = None


@contextlib.contextmanager
def cancel_on(event: threading.Event) -> Iterator[None]:
    """Runs started in this context (this thread, or `asyncio.to_thread` from it) are stopped
    when `event` is set, exactly like a timeout (SIGTERM, grace, SIGKILL), with status
    "killed". A run started after `event` is set is not started at all. A `Cancellation`
    stops them at once; a plain Event within CANCEL_POLL_SECONDS."""
    token = _CANCEL.set(event)
    try:
        yield
    finally:
        _CANCEL.reset(token)


def sweep_orphaned_runs() -> int:
    """Kill every process of runs whose supervising process is gone (a runner killed with
    SIGKILL cannot clean up after itself). Returns how many run cgroups were swept; runs
    of live supervisors are left alone. Cheap; called whenever a run starts."""
    swept = 0
    mine = _owner_tag()
    alive: dict[str, bool] = {}  # owner tag -> its supervisor lives (one /proc read each)
    for parent in (*_cgroup_parents(), memory_parent()):
        if parent is None:
            continue
        with contextlib.suppress(OSError):
            for child in os.scandir(parent):
                parts = child.name.split("-")
                if not (len(parts) == 3 and parts[0] == "run") or parts[1] == mine:
                    continue
                if parts[1] not in alive:
                    pid, _, start = parts[1].partition(".")
                    alive[parts[1]] = pid.isdigit() and _start_time(int(pid)) == start
                if alive[parts[1]] or not child.is_dir(follow_symlinks=False):
                    continue  # its runner is alive
                _kill_cgroup(Path(child.path))
                swept += 1
    return swept


# ---------------------------------------------------------------------------- run


def run_sandboxed(
    cmd: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    wall_seconds: float,
    grace_seconds: float = 5.0,
    limits: Limits | None = None,
    log_path: Path | None = None,
    network: bool = False,
    on_output: Callable[[bytes], None] | None = None,
    writable: list[Path] | tuple[Path, ...] = (),
    readable: list[Path] | tuple[Path, ...] = (),
) -> ProcessResult:
    """Run `cmd` to completion or budget; every process of it is gone when this returns.

    With bubblewrap (module `groundloop.execution.bubblewrap`) the run sees only `cwd`,
    `writable`, its HOME, the folder of GROUNDLOOP_METRICS_OUT and GROUNDLOOP_CACHE_DIR
    (writable), `readable`, the interpreter and the system directories (read-only).
    Raises IsolationUnavailable if `limits.require_full_isolation` and the host falls short."""
    limits = limits or Limits()
    if limits.require_full_isolation:
        if limits.isolate is False:
            raise IsolationUnavailable("require_full_isolation contradicts isolate=False")
        limits = replace(limits, isolate=True)
        require_full_isolation(limits.run_uid)
    token = uuid.uuid4().hex[:16]
    cancel = _CANCEL.get()
    if cancel is not None and cancel.is_set():
        return ProcessResult(None, "killed", 0.0, "[sandbox] cancelled before start\n", {})
    sweep_orphaned_runs()
    box = _Containment(token, limits.max_processes)
    isolation = box.isolation
    started = time.monotonic()
    try:
        leader, memory, output = _start(
            cmd, cwd, env, token, limits, box, log_path, network, on_output, writable, readable
        )
    except BaseException:
        box.remove()
        raise

    status: Literal["exited", "timed_out", "killed"] = "exited"
    isolation_hit = None
    reusable = False
    deadline = started + wall_seconds
    # The kernel caps processes where pids.max is set; else a watcher counts them. Without a
    # cgroup, regular scans also learn the PPid chain of the run's processes before a
    # daemonising parent exits and breaks it.
    watching = box.cgroup is None or (limits.max_processes is not None and not box.kernel_pid_cap)
    next_watch = started + WATCH_SECONDS
    wake_fd = cancel.fileno() if isinstance(cancel, Cancellation) else None
    try:
        while leader.poll() is None:
            now = time.monotonic()
            if now >= deadline:
                status = "timed_out"
                break
            if cancel is not None and cancel.is_set():
                status = "killed"
                isolation["cancelled"] = "stopped by its supervisor (cancel_on)"
                break
            # Sleep until output, the leader's exit, a cancel or the next deadline: no polling
            # but where no fd can say (a plain threading.Event; no pidfd for the leader).
            wait = deadline - now
            if watching:
                wait = min(wait, next_watch - now)
            if cancel is not None and wake_fd is None:
                wait = min(wait, CANCEL_POLL_SECONDS)
            if leader.exit_fd is None:
                wait = min(wait, POLL_SECONDS)
            output.wait(wait, leader.exit_fd, wake_fd)
            if watching and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + WATCH_SECONDS
                count = len(box.pids())
                if limits.max_processes is not None and count > limits.max_processes:
                    isolation["limit_hit"] = f"processes ({count} > {limits.max_processes})"
                    status = "killed"
                    break
        if status == "timed_out" or "cancelled" in isolation:
            why = (
                "cancelled" if "cancelled" in isolation else f"wall budget {wall_seconds:g}s spent"
            )
            output.take(
                f"\n[sandbox] {why}: SIGTERM, then SIGKILL after {grace_seconds:g}s\n".encode()
            )
            box.signal_all(signal.SIGTERM)
            grace_end = time.monotonic() + grace_seconds
            while time.monotonic() < grace_end and box.pids():
                output.wait(min(POLL_SECONDS, grace_end - time.monotonic()), leader.exit_fd)
                leader.poll()
        all_gone = box.kill_all(time.monotonic() + 10)
        if not all_gone:
            isolation["survivors"] = "some processes survived SIGKILL (see runner log)"
        leader.release()
        output.drain(time.monotonic() + 1.0)
        isolation_hit = box.limit_hit() or (memory.limit_hit() if memory else None)
        # Clean: this run's cgroups may serve a later one (cgroup_pool), sparing their making.
        reusable = all_gone and not isolation_hit and "limit_hit" not in isolation
    finally:
        returncode = leader.release()
        output.close()
        box.remove(reusable)
        if memory:
            memory.remove(reusable)
    if status == "exited" and returncode == -signal.SIGKILL:
        status = "killed"  # e.g. the kernel's OOM killer
    tail = bytes(output.tail)
    hit = isolation.get("limit_hit") or isolation_hit or limit_from_exit(returncode, tail)
    if hit:
        isolation["limit_hit"] = hit
    return ProcessResult(
        returncode=returncode,
        status=status,
        wall_seconds=time.monotonic() - started,
        output_tail=tail.decode("utf-8", errors="replace")[-8000:],
        isolation=isolation,
    )


def _start(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str],
    token: str,
    limits: Limits,
    box: _Containment,
    log_path: Path | None,
    network: bool,
    on_output: Callable[[bytes], None] | None,
    writable: list[Path] | tuple[Path, ...],
    readable: list[Path] | tuple[Path, ...],
) -> tuple[Spawned, MemoryLimit | None, RunOutput]:
    """Wrap, limit and start the run in `box` (protections recorded in `box.isolation`);
    on any failure, what was made for it here is undone (the caller removes `box`)."""
    isolation = box.isolation
    wrapped = bwrap_wrapping(cmd, cwd, env, writable, readable, network, limits, isolation)
    memory: MemoryLimit | None = None
    output: RunOutput | None = None
    write_fd = -1
    try:
        unshare_net = False
        if network:
            isolation["network"] = "allowed: requested by caller"
        elif wrapped is not None:
            isolation["network"] = "none (own namespace, loopback only)"
        elif (why := network_isolation_error()) is not None:
            isolation["network"] = f"allowed: {why}"
        else:
            unshare_net = True
        if limits.memory_bytes is not None:
            isolation["memory"] = f"RLIMIT_AS={limits.memory_bytes}"
        if limits.resident_memory_bytes is not None:
            memory = MemoryLimit(f"run-{_owner_tag()}-{token}", limits.resident_memory_bytes)
            isolation["resident_memory"] = memory.detail
        elif not isolation["resident_memory"].startswith("off:"):
            isolation["resident_memory"] = (
                "off: no resident limit asked for (resident_memory_bytes)"
            )
        launch = Launch(
            argv=[os.fspath(a) for a in (wrapped.argv if wrapped else cmd)],
            cwd=os.fspath(cwd),
            env={**env, MARKER: token, **({"TMPDIR": "/tmp"} if wrapped else {})},
            rlimits=rlimits(limits),
            join=box.join_paths() + (memory.join_paths() if memory else []),
            unshare_net=unshare_net,
            uid=wrapped.uid if wrapped else None,
            pass_fds=list(wrapped.fds) if wrapped else [],
            fd_args=list(wrapped.fd_args) if wrapped else [],
        )
        output_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        output = RunOutput(output_fd, open(log_path, "ab") if log_path else None, on_output)  # noqa: SIM115
        leader = spawn(launch, write_fd)
    except BaseException:
        if output:
            output.close()
        if memory:
            memory.remove()
        raise
    finally:
        if write_fd >= 0:
            os.close(write_fd)  # the run holds the only write end now: EOF when it is gone
        if wrapped:
            wrapped.close()
    box.leader = leader.pid
    if unshare_net:
        with contextlib.suppress(OSError):
            same = os.readlink(f"/proc/{leader.pid}/ns/net") == os.readlink("/proc/self/ns/net")
            isolation["network"] = (
                "allowed: namespace not created" if same else "none (own namespace, loopback only)"
            )
        isolation.setdefault("network", "none (own namespace, loopback only)")
    return leader, memory, output


__all__ = [
    "Cancellation",
    "IsolationUnavailable",
    "Limits",
    "ProcessResult",
    "allowed_environment",
    "cancel_on",
    "host_protections",
    "isolation_gaps",
    "network_isolation_error",
    "run_sandboxed",
    "sweep_orphaned_runs",
]
