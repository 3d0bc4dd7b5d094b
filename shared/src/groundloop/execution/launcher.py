"""Start sandboxed runs from a small, long-lived launcher process, not by forking the
supervising one.

Why: the sandbox's child-side setup (join the run's cgroups, rlimits, the parent-death
signal, a network namespace, the run uid: `process_tree._preexec`) must run between fork and
exec, and Python can only do that after a real fork(), never vfork(). fork() of the
supervising process (the search job embeds every service: ~150 MB resident, dozens of
threads) copies its page tables and then pays copy-on-write faults on both sides: 5-10 ms of
its CPU per run, more under load, twice per candidate (pre-flight and run), and all of it
holding the GIL. The launcher is a fresh interpreter of ~16 MB, started once per supervising
process with vfork (nothing runs between its fork and exec); it forks itself, runs the same
setup and execs, for every run (`groundloop.execution.launcher_process`), so the costly fork
becomes a cheap one and none of it is in the supervising process. It never waits for an
exec: a burst of runs sets up side by side.

Protocol: Unix SOCK_SEQPACKET sockets, one JSON message per packet, file descriptors by
SCM_RIGHTS.
- control socket, supervisor -> launcher, one packet per run: the `Launch` request, with the
  fds [reply socket, the output pipe's write end, *the fds the run inherits] (bwrap's
  `--ro-bind-fd N` arguments are renumbered to the launcher's copies);
- reply socket, launcher -> supervisor: {"pid": n} once the run has exec'd (or {"error": ..}:
  what Popen would have raised, raised again in the supervisor), then {"exit": returncode}
  when the run's leader exits. The leader stays a zombie, so its pid and process group id
  cannot be reused while the supervisor signals them, until the supervisor shuts its end
  down (`release`); then the launcher SIGKILLs the process group if the leader still runs,
  reaps it, sends {"cpu": seconds} and closes, which `release` waits for.
- the control socket closing (the supervisor exited or was killed) makes the launcher
  SIGKILL the process group of every run it started and exit; each leader also has the
  parent-death signal (SIGKILL) set against the launcher, as it had against the supervisor.

The launcher is not a subreaper: the orphans of a run still go to the supervisor where it is
one (proc-scan containment, `process_tree`). With GROUNDLOOP_SANDBOX_LAUNCHER=0, or where the
launcher cannot start, runs are forked from the supervising process as before (`_LocalRun`);
the result is the same, only dearer.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from groundloop.execution.bubblewrap import drop_to
from groundloop.execution.process_tree import _libc, _preexec

log = logging.getLogger("groundloop.execution.sandbox")

MAX_PACKET = 1 << 20  # a request: argv, environment, paths; far below this in practice
MAX_FDS = 250  # SCM_RIGHTS carries at most 253 per message
ANSWER_SECONDS = 60.0  # a launch is a fork and an exec; no answer in this long: it is wedged
_SRC_ROOT = str(Path(__file__).resolve().parents[2])
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from groundloop.execution.launcher_process import serve; serve(int(sys.argv[2]))"
)


@dataclass
class Launch:
    """One run to start: what `subprocess.Popen` gets, plus the child-side setup."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    rlimits: list[tuple[int, int]] = field(default_factory=list)
    join: list[str] = field(default_factory=list)  # cgroup.procs files to join before exec
    unshare_net: bool = False
    uid: int | None = None  # become this uid before exec (bubblewrap "drop" mode)
    pass_fds: list[int] = field(default_factory=list)
    fd_args: list[int] = field(default_factory=list)  # argv positions naming pass_fds, in order


class Spawned(Protocol):
    """A started run's leader, however it was started."""

    pid: int
    returncode: int | None

    @property
    def exit_fd(self) -> int | None:
        """Readable when `poll` has news; None once the exit is known (or where no fd can say)."""
        ...

    def poll(self) -> int | None: ...

    def release(self) -> int:
        """SIGKILL the process group if the leader still runs, reap it; its returncode."""
        ...


def spawn(launch: Launch, output_fd: int) -> Spawned:
    """Start `launch` with stdout and stderr on `output_fd`, in a new session."""
    launcher = _launcher()
    if launcher is not None and len(launch.pass_fds) + 2 <= MAX_FDS:
        try:
            return launcher.spawn(launch, output_fd)
        except _Unusable as exc:  # fall through: the run still starts, the slower way
            log.warning("sandbox: launcher not usable (%s); forking this process", exc)
    return _LocalRun(launch, output_fd)


def children_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of every run the launcher has reaped for this process, the launcher's
    own CPU seconds so far): runs are the launcher's children, so this process's
    RUSAGE_CHILDREN does not see them, nor the launcher until it exits."""
    return _reaped_cpu[0], _reaped_cpu[1]


# ---------------------------------------------------------------------- supervisor side


class _Unusable(Exception):
    pass


_lock = threading.Lock()
_current: _Launcher | None = None
_failed_at = -1e9  # monotonic time the launcher last failed to start
_reaped_cpu = [0.0, 0.0]  # runs reaped by the launcher, the launcher itself


def _launcher() -> _Launcher | None:
    global _current, _failed_at
    if os.environ.get("GROUNDLOOP_SANDBOX_LAUNCHER", "1") == "0":
        return None
    with _lock:
        if _current is not None and _current.alive():
            return _current
        if _current is not None:
            _current.close()
            _current = None
        if time.monotonic() - _failed_at < 60:
            return None
        try:
            _current = _Launcher()
        except (OSError, ValueError, _Unusable) as exc:
            _failed_at = time.monotonic()
            log.warning("sandbox: cannot start the launcher (%s); runs fork this process", exc)
        return _current


@atexit.register
def _close_launcher() -> None:
    """At exit: the launcher ends with its control socket (any run left is killed); wait for
    it, so it is reaped rather than reported as still running."""
    with _lock:
        if _current is not None:
            _current.close()


class _Launcher:
    def __init__(self) -> None:
        self.owner = os.getpid()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # vfork-able (no preexec_fn), so starting it costs this process next to nothing;
            # its own session keeps a terminal's Ctrl-C away from it (the supervisor decides).
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, _SRC_ROOT, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            theirs.close()
        self.control = mine
        mine.settimeout(ANSWER_SECONDS)
        try:
            hello = json.loads(mine.recv(4096) or b"{}")
        except (OSError, ValueError) as exc:
            self.close()
            raise _Unusable(f"no greeting: {exc}") from exc
        if not hello.get("ready"):
            self.close()
            raise _Unusable(hello.get("unavailable", "it exited at start"))
        mine.settimeout(None)

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.control.close()
        if self.owner == os.getpid():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def spawn(self, launch: Launch, output_fd: int) -> _LaunchedRun:
        request = json.dumps(vars(launch)).encode()  # flat: no need for asdict's deep copy
        if len(request) > MAX_PACKET:
            raise _Unusable(f"request of {len(request)} bytes")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with theirs:
                fds = [theirs.fileno(), output_fd, *launch.pass_fds]
                socket.send_fds(self.control, [request], fds)
            mine.settimeout(ANSWER_SECONDS)
            answer = json.loads(mine.recv(65536) or b'{"error": "lost"}')
        except TimeoutError as exc:  # wedged: stop it (and its runs); the next run starts another
            mine.close()
            self.proc.kill()
            raise _Unusable(f"no answer in {ANSWER_SECONDS:g} s") from exc
        except (OSError, ValueError) as exc:
            mine.close()
            raise _Unusable(f"{type(exc).__name__}: {exc}") from exc
        if "pid" in answer:
            return _LaunchedRun(mine, answer["pid"])
        mine.close()
        if answer.get("error") == "os":
            raise OSError(answer["errno"], answer["strerror"], answer.get("filename"))
        if answer.get("error") == "subprocess":
            raise subprocess.SubprocessError(answer["message"])
        raise _Unusable(f"launcher answered {answer}")


class _LaunchedRun:
    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock: socket.socket | None = sock
        self.pid = pid
        self.returncode: int | None = None
        sock.setblocking(False)

    @property
    def exit_fd(self) -> int | None:
        return self.sock.fileno() if self.sock is not None and self.returncode is None else None

    def poll(self) -> int | None:
        if self.returncode is None and self.sock is not None:
            try:
                self._take(self.sock.recv(4096))
            except BlockingIOError:
                pass
        return self.returncode

    def _take(self, packet: bytes) -> bool:
        """Record what the launcher said; False at its end of the conversation."""
        if not packet:
            if self.returncode is None:  # it died: it (or the parent-death signal) killed the run
                log.error("sandbox: the launcher ended while run %d was going", self.pid)
                self.returncode = -signal.SIGKILL
            return False
        message = json.loads(packet)
        if "exit" in message and self.returncode is None:
            self.returncode = message["exit"]
        if "cpu" in message:
            with _lock:
                _reaped_cpu[0] += message["cpu"]
                _reaped_cpu[1] = max(_reaped_cpu[1], message["launcher_cpu"])
        return True

    def release(self) -> int:
        if self.sock is not None:
            sock, self.sock = self.sock, None
            try:
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(ANSWER_SECONDS)
                while self._take(sock.recv(4096)):
                    pass
            except (OSError, ValueError) as exc:
                log.error("sandbox: run %d not confirmed reaped by the launcher: %s", self.pid, exc)
            finally:
                sock.close()
        if self.returncode is None:
            self.returncode = -signal.SIGKILL
        return self.returncode


class _LocalRun:
    """The fallback: fork this process (subprocess with a preexec function)."""

    def __init__(self, launch: Launch, output_fd: int) -> None:
        self.proc = _popen(launch, output_fd)
        self.pid = self.proc.pid
        self.returncode: int | None = None
        try:  # readable when the leader exits
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = None

    @property
    def exit_fd(self) -> int | None:
        return self._pidfd if self.returncode is None else None

    def poll(self) -> int | None:
        self.returncode = self.proc.poll()
        return self.returncode

    def release(self) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
        self.returncode = self.proc.wait()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return self.returncode


def _popen(launch: Launch, output_fd: int) -> subprocess.Popen[bytes]:
    """Fork this process and exec `launch` after the child-side setup."""
    return subprocess.Popen(
        launch.argv,
        cwd=launch.cwd,
        env=launch.env,
        stdin=subprocess.DEVNULL,
        stdout=output_fd,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        pass_fds=launch.pass_fds,
        preexec_fn=child_setup(launch),
    )


def child_setup(launch: Launch) -> Callable[[], None]:
    """What runs in the child between fork and exec (process_tree._preexec), made before the
    fork: cgroups, rlimits, the parent-death signal against the forking process, netns, uid."""
    uid = launch.uid
    return _preexec(
        [(int(which), int(value)) for which, value in launch.rlimits],
        launch.join,
        _libc().unshare if launch.unshare_net else None,
        (lambda: drop_to(uid)) if uid is not None else None,
    )
