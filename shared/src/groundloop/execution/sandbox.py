"""Run untrusted code: own session, allow-listed environment, limits, hard budget, no network.

`run_sandboxed(cmd, ...)` starts `cmd` in a new session/process group with an allow-listed
environment (`allowed_environment`), rlimits (memory as RLIMIT_AS, processes, file size, open
files), in a new network namespace when the OS allows it (loopback up, nothing else), streams
its merged stdout/stderr to a log file and a callback, and enforces a wall-clock budget:
SIGTERM to every process of the run, a grace period, then SIGKILL. Every process of the run
is found and killed at the end, including grandchildren that called setsid() or daemonised,
by containment "cgroup2" (a fresh cgroup per run, with a kernel process cap via `pids.max`)
or else "proc-scan" (a child subreaper scanning /proc for the run's processes). How is
`groundloop.execution.process_tree`, the OS-level half, kept apart so that this module (the public API
and the supervising loop) reads in one sitting.

What was enforced, and any limit that was hit, is recorded in `ProcessResult.isolation`,
which the runner copies into the run's provenance. Used by groundloop.execution.environment.execute.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import resource
import select
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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

log = logging.getLogger(__name__)

TAIL_BYTES = 16_384
POLL_SECONDS = 0.05
WATCH_SECONDS = 0.2  # process-cap / containment sweep period
# Set by `cancel_on`; read by run_sandboxed (asyncio.to_thread copies it into the worker).
_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "sandbox_cancel", default=None
)

# Variables a run may inherit from the runner: locale, paths, thread counts, device selection.
_ALLOWED_NAMES = {
    "PATH",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TERM",
    "USER",
    "LOGNAME",
    "SHELL",
    "PYTHONHASHSEED",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONIOENCODING",
    "PYTHONUTF8",
    "PYTHONPATH",
    "PYTHONWARNINGS",
    "PYTHONFAULTHANDLER",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "CUDA_HOME",
    "CUDA_PATH",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
}
_ALLOWED_PREFIXES = ("LC_", "NCCL_", "TORCH_", "CUBLAS_", "CUDNN_")
# Denied even when allowed above or passed in `extra`: credentials by name, cloud SDK config.
_SECRET = re.compile(
    r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|SESSION_KEY|AUTH)"
    r"|^(AWS|GOOGLE|GCLOUD|GCP|AZURE|OPENAI|ANTHROPIC|HF|HUGGING_?FACE|WANDB|GITHUB|GH|NATS)_",
    re.IGNORECASE,
)
# The run's own variables; any other GROUNDLOOP_* (broker URL, DB URL, keys) stays out.
RUN_VARIABLES = {
    "GROUNDLOOP_SEED",
    "GROUNDLOOP_DEVICE",
    "GROUNDLOOP_METRICS_OUT",
    "GROUNDLOOP_SPLIT",
    "GROUNDLOOP_CACHE_DIR",
    "GROUNDLOOP_SMOKE",
}


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = None  # RLIMIT_AS (leave None for CUDA runs: it reserves VA)
    max_processes: int | None = None
    file_size_bytes: int | None = None
    open_files: int | None = None


@dataclass
class ProcessResult:
    returncode: int | None
    status: Literal["exited", "timed_out", "killed"]
    wall_seconds: float
    output_tail: str
    isolation: dict[str, str] = field(default_factory=dict)


def allowed_environment(extra: dict[str, str], home: Path) -> dict[str, str]:
    """The runner's environment reduced to the allow-list, HOME=`home`, plus `extra`.

    `extra` is the run's own settings (GROUNDLOOP_SEED, …, CUDA_VISIBLE_DEVICES); secrets and
    GROUNDLOOP_* service settings are dropped from it too, so a caller cannot leak them.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if (name in _ALLOWED_NAMES or name.startswith(_ALLOWED_PREFIXES))
        and not _SECRET.search(name)
    }
    for name, value in extra.items():
        if _SECRET.search(name) or (name.startswith("GROUNDLOOP_") and name not in RUN_VARIABLES):
            log.warning("sandbox: not passing %s to the run (secret or service setting)", name)
            continue
        env[name] = str(value)
    env["HOME"] = str(home)
    return env


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


def _rlimits(limits: Limits) -> list[tuple[int, int]]:
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
) -> ProcessResult:
    """Run `cmd` to completion or budget; every process of it is gone when this returns."""
    limits = limits or Limits()
    token = uuid.uuid4().hex[:16]
    cancel = _CANCEL.get()
    if cancel is not None and cancel.is_set():
        return ProcessResult(None, "killed", 0.0, "[sandbox] cancelled before start\n", {})
    sweep_orphaned_runs()
    box = _Containment(token, limits.max_processes)
    isolation = box.isolation
    net_unshare = None
    if network:
        isolation["network"] = "allowed: requested by caller"
    elif (why := network_isolation_error()) is not None:
        isolation["network"] = f"allowed: {why}"
    else:
        net_unshare = _libc().unshare
    if limits.memory_bytes is not None:
        isolation["memory"] = f"RLIMIT_AS={limits.memory_bytes}"
    tail = bytearray()
    log_file = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**env, MARKER: token},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_preexec(_rlimits(limits), box.join_paths(), net_unshare),
        )
    except BaseException:
        if log_file:
            log_file.close()
        box.remove()
        raise
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
        isolation_hit = box.limit_hit()
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
    if status == "exited" and proc.returncode == -signal.SIGKILL:
        status = "killed"  # e.g. the kernel's OOM killer
    hit = (
        isolation.get("limit_hit")
        or isolation_hit
        or _limit_from_exit(proc.returncode, bytes(tail))
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


def _limit_from_exit(returncode: int | None, tail: bytes) -> str | None:
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


__all__ = [
    "Limits",
    "ProcessResult",
    "allowed_environment",
    "cancel_on",
    "network_isolation_error",
    "run_sandboxed",
    "sweep_orphaned_runs",
]
