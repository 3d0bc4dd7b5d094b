"""Run untrusted code: own session, allow-listed environment, limits, hard budget, no network.

`run_sandboxed(cmd, ...)` starts `cmd` in a new session/process group with an allow-listed
environment (`allowed_environment`), rlimits (memory as RLIMIT_AS, processes, file size, open
files), in a new network namespace when the OS allows it (loopback up, nothing else), streams
its merged stdout/stderr to a log file and a callback, and enforces a wall-clock budget:
SIGTERM to every process of the run, a grace period, then SIGKILL. Every process of the run
is found and killed at the end, including grandchildren that called setsid() or daemonised:

- containment "cgroup2": a fresh cgroup per run (joined before exec, inherited by every
  descendant, killed with cgroup.kill); a kernel process cap via `pids.max` (cgroup v2 pids
  controller, or the v1 pids hierarchy where that is what is mounted);
- otherwise "proc-scan": the supervising process becomes a child subreaper (so orphans stay
  its descendants) and /proc is scanned for the run's session, process group, PPid chain and
  a marker variable; the process cap is enforced by this watcher (RLIMIT_NPROC does not bind
  root, so it is never the only guard).

What was enforced, and any limit that was hit, is recorded in `ProcessResult.isolation`,
which the runner copies into the run's provenance. Used by groundloop.environment.execute.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import fcntl
import functools
import logging
import os
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

TAIL_BYTES = 16_384
POLL_SECONDS = 0.05
WATCH_SECONDS = 0.2  # process-cap / containment sweep period
MARKER = "GROUNDLOOP_SANDBOX_RUN"
CLONE_NEWNET = 0x40000000
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
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


def _owner_tag() -> str:
    """`<pid>.<start time>` of this process: names its run cgroups, so a later sweep can tell
    the runs of a dead (SIGKILLed) runner from those of a live one."""
    pid = os.getpid()
    return f"{pid}.{_start_time(pid)}"


def _start_time(pid: int) -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    return "0"


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


def _kill_cgroup(path: Path) -> None:
    with contextlib.suppress(OSError):
        if (path / "cgroup.kill").exists():
            (path / "cgroup.kill").write_text("1")
        for _ in range(100):
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            try:
                path.rmdir()
                return
            except OSError:
                time.sleep(0.01)


# ---------------------------------------------------------------------------- OS probes


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def network_isolation_error() -> str | None:
    """None when a child can get its own network namespace; else why not (cached)."""
    try:
        unshare = _libc().unshare
    except AttributeError:
        return "libc has no unshare()"
    try:
        subprocess.run(["true"], preexec_fn=lambda: _unshare_net(unshare), check=True, timeout=10)
    except subprocess.SubprocessError as exc:
        return f"unshare(CLONE_NEWNET) refused ({exc}); needs root or CAP_SYS_ADMIN"
    except OSError as exc:
        return f"cannot probe network namespaces: {exc}"
    return None


def _unshare_net(unshare: Callable[[int], int]) -> None:
    # Runs in the child between fork and exec: C calls only, nothing that takes a lock.
    if unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    with contextlib.suppress(OSError):  # loopback up: torchrun/NCCL rendezvous on 127.0.0.1
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ifreq = struct.pack("16sH14x", b"lo", 0x1 | 0x8 | 0x40)  # IFF_UP|LOOPBACK|RUNNING
        fcntl.ioctl(s.fileno(), 0x8914, ifreq)  # SIOCSIFFLAGS
        s.close()


def _mount_points(fstype: str) -> list[tuple[Path, str]]:
    """(mount point, super options) of every mount of `fstype`."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fs = right.split()
            if fs and fs[0] == fstype:
                found.append((Path(left.split()[4]), fs[-1]))
    return found


@functools.cache
def _cgroup_parents() -> tuple[Path | None, Path | None]:
    """(cgroup2 dir we may create run cgroups in, v1 pids dir) — None where not writable."""
    v2 = v1_pids = None
    own = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            own[controllers] = path.lstrip("/")
    for mount, _ in _mount_points("cgroup2"):
        parent = mount / own.get("", "") / "groundloop"
        if _writable_cgroup(parent, "cgroup.procs"):
            v2 = parent
            break
    for mount, options in _mount_points("cgroup"):
        if "pids" in options.split(","):
            parent = mount / own.get("pids", "") / "groundloop"
            if _writable_cgroup(parent, "pids.max"):
                v1_pids = parent
                break
    return v2, v1_pids


def _writable_cgroup(parent: Path, probe_file: str) -> bool:
    """Whether run cgroups can be made under `parent` and a child process can join one
    (systemd hosts may allow mkdir but refuse the move)."""
    probe = parent / f"probe-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):  # v2: let run cgroups have pids.max where delegated
            (parent / "cgroup.subtree_control").write_text("+pids")
        probe.mkdir()
        if not (probe / probe_file).exists():
            return False
        join = _preexec(Limits(), [str(probe / "cgroup.procs")], None)
        subprocess.run(["true"], preexec_fn=join, check=True, timeout=10)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        _remove_cgroup(probe)


def _remove_cgroup(path: Path) -> None:
    for _ in range(50):  # the kernel frees an emptied cgroup asynchronously
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


@functools.cache
def _become_subreaper() -> bool:
    with contextlib.suppress(AttributeError, OSError):
        return _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return False


# ---------------------------------------------------------------------------- the run's processes


class _Containment:
    """Knows every process of one run, and kills them all."""

    def __init__(self, run_token: str, max_processes: int | None) -> None:
        self.token = run_token
        self.leader: int | None = None
        self.known: dict[int, int] = {}  # pid -> start time (guards against pid reuse)
        self.isolation: dict[str, str] = {}
        self.cgroup: Path | None = None
        self.pids_cgroup: Path | None = None
        # GROUNDLOOP_SANDBOX_CGROUPS=0: an operator's switch for hosts whose cgroups misbehave.
        use_cgroups = os.environ.get("GROUNDLOOP_SANDBOX_CGROUPS", "1") != "0"
        v2_parent, v1_pids_parent = _cgroup_parents() if use_cgroups else (None, None)
        name = f"run-{_owner_tag()}-{run_token}"
        with contextlib.suppress(OSError):
            if v2_parent is not None:
                (v2_parent / name).mkdir()
                self.cgroup = v2_parent / name
        if self.cgroup is not None:
            self.isolation["containment"] = f"cgroup2 {self.cgroup}"
        else:
            reaper = "subreaper" if _become_subreaper() else "no subreaper"
            self.isolation["containment"] = f"proc-scan ({reaper}; no writable cgroup2)"
        if max_processes is not None:
            pids_dir = self.cgroup if self.cgroup and (self.cgroup / "pids.max").exists() else None
            with contextlib.suppress(OSError):
                if pids_dir is None and v1_pids_parent is not None:
                    (v1_pids_parent / name).mkdir()
                    pids_dir = self.pids_cgroup = v1_pids_parent / name
                if pids_dir is not None:
                    (pids_dir / "pids.max").write_text(str(max_processes))
                    self.isolation["processes"] = f"pids.max={max_processes} (kernel)"
            self.pids_file = (pids_dir / "pids.events") if pids_dir else None
            self.isolation.setdefault(
                "processes",
                f"cap {max_processes} by watcher (no pids cgroup; RLIMIT_NPROC spares root)",
            )
        else:
            self.pids_file = None

    def join_paths(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in (self.cgroup, self.pids_cgroup) if d is not None]

    def pids(self) -> set[int]:
        """Live processes of the run (zombies excluded)."""
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                return {int(p) for p in (self.cgroup / "cgroup.procs").read_text().split()}
        return self._scan(read_environ=False)

    def _scan(self, read_environ: bool) -> set[int]:
        me = os.getpid()
        table: dict[int, tuple[int, int, int, int, str]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                    fields = stat[stat.rindex(")") + 2 :].split()
                    # state, ppid, pgrp, session, ..., starttime (field 22)
                    table[int(entry.name)] = (
                        int(fields[1]),
                        int(fields[2]),
                        int(fields[3]),
                        int(fields[19]),
                        fields[0],
                    )
        found = {
            pid for pid, start in self.known.items() if table.get(pid, (0, 0, 0, -1))[3] == start
        }
        if self.leader is not None:
            found |= {pid for pid, row in table.items() if self.leader in (row[1], row[2])}
        grew = True
        while grew:
            children = {pid for pid, row in table.items() if row[0] in found and pid not in found}
            found |= children
            grew = bool(children)
        if read_environ:  # orphans adopted by us after a fast double fork, found by marker
            for pid, row in table.items():
                if row[0] in (me, 1) and pid not in found:
                    with contextlib.suppress(OSError):
                        if (
                            f"{MARKER}={self.token}".encode()
                            in Path(f"/proc/{pid}/environ").read_bytes()
                        ):
                            found.add(pid)
        found.discard(me)
        for pid in found:
            self.known[pid] = table[pid][3]
        return {pid for pid in found if table[pid][4] != "Z"}

    def signal_all(self, sig: int) -> None:
        if (
            sig == signal.SIGKILL
            and self.cgroup is not None
            and (self.cgroup / "cgroup.kill").exists()
        ):
            with contextlib.suppress(OSError):
                (self.cgroup / "cgroup.kill").write_text("1")
        if self.leader is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.leader, sig)
        for pid in self.pids() | (self._scan(read_environ=True) if self.cgroup is None else set()):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    def kill_all(self, deadline: float) -> bool:
        """SIGKILL until nothing of the run is left or `deadline`; True when empty."""
        while True:
            self.signal_all(signal.SIGKILL)
            self._reap_adopted()
            left = self.pids() if self.cgroup is not None else self._scan(read_environ=True)
            if not left:
                self._reap_adopted()  # the last ones may have died after the reap above
                return True
            if time.monotonic() > deadline:
                log.error(
                    "sandbox: processes %s of run %s survive SIGKILL", sorted(left), self.token
                )
                return False
            time.sleep(0.01)

    def _reap_adopted(self) -> None:
        # Orphans adopted by this (subreaper) process become our zombies: reap exactly those.
        for pid, start in list(self.known.items()):
            # The start time guards against a recycled pid: never reap another run's leader.
            if pid != self.leader and _start_time(pid) == str(start):
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)

    def limit_hit(self) -> str | None:
        with contextlib.suppress(OSError, AttributeError, TypeError):
            match = re.search(r"^max (\d+)", self.pids_file.read_text(), re.M)  # type: ignore[union-attr]
            if match and int(match.group(1)) > 0:
                return f"processes (fork refused {match.group(1)} times)"
        return None

    def remove(self) -> None:
        for d in (self.cgroup, self.pids_cgroup):
            if d is not None:
                _remove_cgroup(d)


def _preexec(
    limits: Limits, join: list[str], net_unshare: Callable[[int], int] | None
) -> Callable[[], None]:
    """Child-side setup between fork and exec (after setsid): cgroups, rlimits, netns."""
    rlimits = [(resource.RLIMIT_CORE, 0)]
    if limits.memory_bytes is not None:
        rlimits.append((resource.RLIMIT_AS, limits.memory_bytes))
    if limits.max_processes is not None:
        rlimits.append((resource.RLIMIT_NPROC, limits.max_processes))
    if limits.file_size_bytes is not None:
        rlimits.append((resource.RLIMIT_FSIZE, limits.file_size_bytes))
    if limits.open_files is not None:
        rlimits.append((resource.RLIMIT_NOFILE, limits.open_files))

    prctl, parent = _libc().prctl, os.getpid()

    def setup() -> None:
        # SIGKILL the run's leader if the supervising thread dies (runner SIGKILLed); the
        # rest of the run is found by sweep_orphaned_runs() on that host's next run.
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(137)
        for path in join:  # before anything else, so no descendant starts outside the cgroup
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        for which, value in rlimits:
            resource.setrlimit(which, (value, value))
        if net_unshare is not None:
            _unshare_net(net_unshare)

    return setup


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
            preexec_fn=_preexec(limits, box.join_paths(), net_unshare),
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
