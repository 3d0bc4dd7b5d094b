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
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import select
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from groundloop.execution.bubblewrap import (
    IsolationUnavailable,
    drop_to,
    host_protections,
    isolation_gaps,
    require_full_isolation,
)
from groundloop.execution.cgroup_memory import MemoryLimit
from groundloop.execution.process_tree import CLONE_NEWNET as CLONE_NEWNET
from groundloop.execution.process_tree import MARKER as MARKER
from groundloop.execution.process_tree import PR_SET_CHILD_SUBREAPER as PR_SET_CHILD_SUBREAPER
from groundloop.execution.process_tree import PR_SET_PDEATHSIG as PR_SET_PDEATHSIG
from groundloop.execution.process_tree import (
    _cgroup_parents,
    _Containment,
    _kill_cgroup,
    _libc,
    _preexec,
    _start_time,
    network_isolation_error,
)
from groundloop.execution.run_env import RUN_VARIABLES as RUN_VARIABLES
from groundloop.execution.run_env import allowed_environment as allowed_environment
from groundloop.execution.sandbox_limits import Limits as Limits
from groundloop.execution.sandbox_limits import bwrap_wrapping, limit_from_exit, rlimits

log = logging.getLogger(__name__)

TAIL_BYTES = 16_384
POLL_SECONDS = 0.05
WATCH_SECONDS = 0.2  # process-cap / containment sweep period
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


@contextlib.contextmanager
def cancel_on(event: threading.Event) -> Iterator[None]:
    """Runs started in this context (this thread, or `asyncio.to_thread` from it) are stopped
    when `event` is set, exactly like a timeout (SIGTERM, grace, SIGKILL), with status
    "killed". A run started after `event` is set is not started at all."""
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
    for parent in _cgroup_parents():
        if parent is None:
            continue
        with contextlib.suppress(OSError):
            for child in parent.iterdir():
                parts = child.name.split("-")
                if not (len(parts) == 3 and parts[0] == "run" and child.is_dir()):
                    continue
                pid, _, start = parts[1].partition(".")
                if pid.isdigit() and _start_time(int(pid)) == start:
                    continue  # its runner is alive
                _kill_cgroup(child)
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
    wrapped = bwrap_wrapping(cmd, cwd, env, writable, readable, network, limits, isolation)
    net_unshare = None
    if network:
        isolation["network"] = "allowed: requested by caller"
    elif wrapped is not None:
        isolation["network"] = "none (own namespace, loopback only)"
    elif (why := network_isolation_error()) is not None:
        isolation["network"] = f"allowed: {why}"
    else:
        net_unshare = _libc().unshare
    if limits.memory_bytes is not None:
        isolation["memory"] = f"RLIMIT_AS={limits.memory_bytes}"
    memory = (
        MemoryLimit(f"run-{token}", limits.resident_memory_bytes)
        if limits.resident_memory_bytes is not None
        else None
    )
    if memory is not None:
        isolation["resident_memory"] = memory.detail
    elif not isolation["resident_memory"].startswith("off:"):
        isolation["resident_memory"] = "off: no resident limit asked for (resident_memory_bytes)"
    tail = bytearray()
    log_file = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
    started = time.monotonic()
    try:
        uid = wrapped.uid if wrapped else None
        proc = subprocess.Popen(
            wrapped.argv if wrapped else cmd,
            cwd=cwd,
            env={**env, MARKER: token, **({"TMPDIR": "/tmp"} if wrapped else {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=wrapped.fds if wrapped else (),
            preexec_fn=_preexec(
                rlimits(limits),
                box.join_paths() + (memory.join_paths() if memory else []),
                net_unshare,
                (lambda: drop_to(uid)) if uid is not None else None,
            ),
        )
    except BaseException:
        if log_file:
            log_file.close()
        box.remove()
        if memory:
            memory.remove()
        raise
    finally:
        if wrapped:
            wrapped.close()
    box.leader = proc.pid
    if net_unshare is not None:
        with contextlib.suppress(OSError):
            same = os.readlink(f"/proc/{proc.pid}/ns/net") == os.readlink("/proc/self/ns/net")
            isolation["network"] = (
                "allowed: namespace not created" if same else "none (own namespace, loopback only)"
            )
        isolation.setdefault("network", "none (own namespace, loopback only)")

    def take(data: bytes) -> None:
        tail.extend(data)
        del tail[:-TAIL_BYTES]
        if log_file:
            log_file.write(data)
            log_file.flush()
        if on_output is not None:
            try:
                on_output(data)
            except Exception:  # a failing log sink must not kill the run
                log.exception("sandbox: on_output callback failed")

    fd = proc.stdout.fileno()  # type: ignore[union-attr]
    os.set_blocking(fd, False)

    try:  # readable when the leader exits: no polling delay between exit and cleanup
        exit_fd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        exit_fd = None
    open_output = True

    def pump(timeout: float, until_exit: bool = True) -> None:
        """Take output for up to `timeout` (less if the leader exits, when `until_exit`)."""
        nonlocal open_output
        fds = [fd] if open_output else []
        if until_exit and exit_fd is not None:
            fds.append(exit_fd)
        if not fds:
            time.sleep(max(timeout, 0))
            return
        ready, _, _ = select.select(fds, [], [], max(timeout, 0))
        if fd in ready and open_output:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if data:
                take(data)
            else:
                open_output = False

    status: Literal["exited", "timed_out", "killed"] = "exited"
    isolation_hit = None
    deadline = started + wall_seconds
    next_watch = started + WATCH_SECONDS
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now >= deadline:
                status = "timed_out"
                break
            if cancel is not None and cancel.is_set():
                status = "killed"
                isolation["cancelled"] = "stopped by its supervisor (cancel_on)"
                break
            pump(min(POLL_SECONDS, deadline - now))
            # Without a cgroup, regular scans also learn the PPid chain of the run's processes
            # before a daemonising parent exits and breaks it.
            watching = limits.max_processes is not None or box.cgroup is None
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
            take(f"\n[sandbox] {why}: SIGTERM, then SIGKILL after {grace_seconds:g}s\n".encode())
            box.signal_all(signal.SIGTERM)
            grace_end = time.monotonic() + grace_seconds
            while time.monotonic() < grace_end and box.pids():
                pump(POLL_SECONDS, until_exit=False)
                proc.poll()
        all_gone = box.kill_all(time.monotonic() + 10)
        if not all_gone:
            isolation["survivors"] = "some processes survived SIGKILL (see runner log)"
        proc.wait()
        drain_end = time.monotonic() + 1.0
        while open_output and time.monotonic() < drain_end:
            pump(0.05, until_exit=False)
        isolation_hit = box.limit_hit() or (memory.limit_hit() if memory else None)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        if exit_fd is not None:
            os.close(exit_fd)
        if log_file:
            log_file.close()
        box.remove()
        if memory:
            memory.remove()
    if status == "exited" and proc.returncode == -signal.SIGKILL:
        status = "killed"  # e.g. the kernel's OOM killer
    hit = (
        isolation.get("limit_hit") or isolation_hit or limit_from_exit(proc.returncode, bytes(tail))
    )
    if hit:
        isolation["limit_hit"] = hit
    return ProcessResult(
        returncode=proc.returncode,
        status=status,
        wall_seconds=time.monotonic() - started,
        output_tail=tail.decode("utf-8", errors="replace")[-8000:],
        isolation=isolation,
    )


__all__ = [
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
