"""How a sandboxed run's processes are found, contained and killed: the OS-level half of
`groundloop.execution.sandbox`.

- containment "cgroup2": a fresh cgroup per run (joined before exec, inherited by every
  descendant, killed with cgroup.kill); a kernel process cap via `pids.max` (cgroup v2 pids
  controller, or the v1 pids hierarchy where that is what is mounted);
- otherwise "proc-scan": the supervising process becomes a child subreaper (so orphans stay
  its descendants) and /proc is scanned for the run's session, process group, PPid chain and
  a marker variable; the process cap is enforced by this watcher (RLIMIT_NPROC does not bind
  root, so it is never the only guard);
- the child-side setup between fork and exec (`_preexec`): join the run's cgroups, rlimits,
  parent-death signal, and a fresh network namespace with loopback up (`_unshare_net`).

Separate from `groundloop.execution.sandbox` (the public API: limits, environment, budget, output) so
each reads in one sitting. These names are private to that module, which imports them with
their leading underscore kept; nothing else should use them. Logs go to the
"groundloop.execution.sandbox" logger, as they did before the split.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from groundloop.execution import cgroup_pool

# One component to operators: its logs keep the name they had before this module was split out.
log = logging.getLogger("groundloop.execution.sandbox")

MARKER = "GROUNDLOOP_SANDBOX_RUN"
CLONE_NEWNET = 0x40000000
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1


def _owner_tag() -> str:
    """`<pid>.<start time>` of this process: names its run cgroups, so a later sweep can tell
    the runs of a dead (SIGKILLed) runner from those of a live one."""
    pid = os.getpid()
    if _owner[0] != pid:  # read once per process (a forked child is another owner)
        _owner[:] = [pid, f"{pid}.{_start_time(pid)}"]
    return str(_owner[1])


_owner: list[int | str] = [0, ""]


def _start_time(pid: int) -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    return "0"


def _kill_cgroup(path: Path) -> None:
    with contextlib.suppress(OSError):
        if (path / "cgroup.kill").exists():
            (path / "cgroup.kill").write_text("1")
        for _ in range(100):
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if not pids and (path / "memory.force_empty").exists():
                with contextlib.suppress(OSError):  # v1 memory: no dead group left charged
                    (path / "memory.force_empty").write_text("0")
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
        join = _preexec([], [str(probe / "cgroup.procs")], None)
        subprocess.run(["true"], preexec_fn=join, check=True, timeout=10)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        _remove_cgroup(probe)


def _make_cgroup(path: Path) -> Path | None:
    try:
        path.mkdir()
    except OSError:
        return None
    return path


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
        self.max_processes = max_processes
        name = f"run-{_owner_tag()}-{run_token}"
        if v2_parent is not None:
            self.cgroup = cgroup_pool.take(v2_parent, max_processes) or _make_cgroup(
                v2_parent / name
            )
        if self.cgroup is not None:
            self.isolation["containment"] = f"cgroup2 {self.cgroup}"
        else:
            reaper = "subreaper" if _become_subreaper() else "no subreaper"
            self.isolation["containment"] = f"proc-scan ({reaper}; no writable cgroup2)"
        if max_processes is not None:
            pids_dir = self.cgroup if self.cgroup and (self.cgroup / "pids.max").exists() else None
            with contextlib.suppress(OSError):
                if pids_dir is None and v1_pids_parent is not None:
                    self.pids_cgroup = cgroup_pool.take(v1_pids_parent, max_processes)
                    pids_dir = self.pids_cgroup = self.pids_cgroup or _make_cgroup(
                        v1_pids_parent / name
                    )
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
        self.kernel_pid_cap = self.isolation.get("processes", "").endswith("(kernel)")
        self._kill_file = (
            self.cgroup / "cgroup.kill"
            if self.cgroup is not None and (self.cgroup / "cgroup.kill").exists()
            else None
        )

    def join_paths(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in (self.cgroup, self.pids_cgroup) if d is not None]

    def pids(self) -> set[int]:
        """Live processes of the run (zombies excluded)."""
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                with open(self.cgroup / "cgroup.procs", "rb") as procs:
                    return {int(p) for p in procs.read().split()}
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
        if sig == signal.SIGKILL and self._kill_file is not None:
            with contextlib.suppress(OSError), open(self._kill_file, "wb", buffering=0) as kill:
                kill.write(b"1")
        if self.leader is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.leader, sig)
        for pid in self.pids() | (self._scan(read_environ=True) if self.cgroup is None else set()):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    def kill_all(self, deadline: float) -> bool:
        """SIGKILL until nothing of the run is left or `deadline`; True when empty."""
        if self.cgroup is not None and not self.pids():
            # An empty run cgroup stays empty (only its members could add one): of the loop
            # below only the signal to the process group could still reach anything.
            if self.leader is not None:
                with contextlib.suppress(OSError):
                    os.killpg(self.leader, signal.SIGKILL)
            return True
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

    def remove(self, reusable: bool = False) -> None:
        """Remove the run's cgroups, or keep them for a later run of this process
        (`cgroup_pool`) when `reusable`: the run ended clean, no limit hit."""
        for d in (self.cgroup, self.pids_cgroup):
            if d is not None:
                cgroup_pool.give_back(
                    d, self.max_processes, reusable=reusable, remove=_remove_cgroup
                )


def _preexec(
    limits: list[tuple[int, int]],
    join: list[str],
    net_unshare: Callable[[int], int] | None,
    drop_to: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """Child-side setup between fork and exec (after setsid): cgroups, rlimits, netns, and
    `drop_to` (become the run's uid; last, since joining cgroups needs the runner's rights).
    `limits` are (resource, value) pairs (groundloop.execution.sandbox builds them from its
    `Limits`); core dumps are always off."""
    rlimits = [(resource.RLIMIT_CORE, 0), *limits]

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
        if drop_to is not None:
            drop_to()
            # Changing credentials clears the parent-death signal: set it again.
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(137)

    return setup
