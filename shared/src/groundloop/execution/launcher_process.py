"""The launcher process's side of `groundloop.execution.launcher`: one single-threaded loop
that forks and execs the runs a supervising process asks for, reports each one's exit, and
reaps it when the supervisor is done with it.

A fork here never waits for the exec: the child reports a failure (chdir, setup, exec) on a
close-on-exec pipe and the loop answers when that pipe closes (exec'd: {"pid": n}) or speaks
(failed: the error, which the supervisor raises as Popen would have). So a burst of runs
(64 replicas starting a wave at once) sets up its children side by side, as forking threads of
the supervisor did, instead of one exec after another. Each child does what Popen's child does
(new session, stdin /dev/null, stdout and stderr to the output pipe, only the passed fds kept,
SIGPIPE and SIGXFSZ back to default, the working directory) plus the sandbox's setup
(`launcher.child_setup`: cgroups, rlimits, the parent-death signal, netns, uid).

Runs as `python -I -c launcher._BOOT`; imports only the standard library and
`groundloop.execution` modules that do.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import socket
from collections.abc import Callable, Mapping
from typing import NoReturn

from groundloop.execution.launcher import MAX_FDS, MAX_PACKET, Launch, child_setup

Selector = selectors.BaseSelector


class _Child:
    def __init__(self, pid: int, reply: socket.socket, errors: int) -> None:
        self.pid, self.reply, self.errors = pid, reply, errors
        self.pidfd = os.pidfd_open(pid)  # it cannot be reaped behind our back: we are its parent
        self.exited = self.released = False


def serve(control_fd: int) -> None:
    """Start runs, report their exits, reap them; until the supervisor goes."""
    control = socket.socket(fileno=control_fd)
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError) as exc:
        control.send(json.dumps({"unavailable": f"no pidfd_open: {exc}"}).encode())
        return
    control.send(b'{"ready": true}')
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ, ("control", 0))
    children: dict[int, _Child] = {}  # by pid
    while True:
        for key, _ in selector.select():
            what, pid = key.data
            if what == "control":
                if not _receive(control, selector, children):
                    _stop_all(children)
                    return
            elif what == "started":
                _on_started(children[pid], selector, children)
            elif what == "exit":
                _on_exit(children[pid], selector, children)
            else:
                _on_release(children[pid], selector, children)


def _receive(control: socket.socket, selector: Selector, children: dict[int, _Child]) -> bool:
    """Fork the run of one request; False when the supervisor has gone."""
    packet, fds, flags, _ = socket.recv_fds(control, MAX_PACKET, MAX_FDS)
    if not packet and not fds:
        return False
    if not fds:
        return True  # nowhere to answer: nothing to do
    reply = socket.socket(fileno=fds[0])
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) < 2:
            raise ValueError("launch request truncated")
        launch = Launch(**json.loads(packet))
        launch.pass_fds = fds[2:]
        for position, fd in zip(launch.fd_args, launch.pass_fds, strict=True):
            launch.argv[position] = str(fd)
        setup = child_setup(launch)
        errors, errors_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
            if pid == 0:
                _exec(launch, fds[1], errors_w, setup)
        except BaseException:
            os.close(errors)
            raise
        finally:
            os.close(errors_w)
    except OSError as exc:
        _answer(reply, _os_error(exc))
        return True
    except (ValueError, TypeError) as exc:
        _answer(reply, {"error": "subprocess", "message": f"bad launch request: {exc}"})
        return True
    finally:
        for fd in fds[1:]:  # the child has its copies; holding the pipe would hide its EOF
            os.close(fd)
    children[pid] = _Child(pid, reply, errors)
    selector.register(errors, selectors.EVENT_READ, ("started", pid))
    return True


def _exec(launch: Launch, output: int, errors: int, setup: Callable[[], None]) -> NoReturn:
    """In the forked child: become the run, or report why not on `errors` and exit."""
    report: dict[str, object] = {}
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        for fd in launch.pass_fds:
            os.set_inheritable(fd, True)
        _close_all_but({0, 1, 2, errors, *launch.pass_fds})
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them; the run must not
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.chdir(launch.cwd)
        except OSError as exc:
            report = _os_error(exc, launch.cwd)
            raise
        try:
            setup()
        except BaseException:
            report = {"error": "subprocess", "message": "Exception occurred in preexec_fn."}
            raise
        try:
            os.execvpe(launch.argv[0], launch.argv, launch.env)
        except OSError as exc:
            report = _os_error(exc, launch.argv[0])
            raise
    except BaseException as exc:
        report = report or {"error": "subprocess", "message": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(BaseException):
            os.write(errors, json.dumps(report).encode())
    finally:
        os._exit(255)


def _close_all_but(keep: set[int]) -> None:
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _os_error(exc: OSError, filename: object = None) -> dict[str, object]:
    return {"error": "os", "errno": exc.errno, "strerror": exc.strerror,
            "filename": filename if filename is not None else exc.filename}  # fmt: skip


def _answer(reply: socket.socket, answer: Mapping[str, object], close: bool = True) -> None:
    with contextlib.suppress(OSError):
        reply.send(json.dumps(answer).encode())
    if close:
        reply.close()


def _on_started(child: _Child, selector: Selector, children: dict[int, _Child]) -> None:
    """The error pipe closed (exec'd: report the pid) or spoke (failed: report why)."""
    chunks = []
    while chunk := os.read(child.errors, 65536):  # the child wrote at most once, then exited
        chunks.append(chunk)
    selector.unregister(child.errors)
    os.close(child.errors)
    if chunks:
        os.close(child.pidfd)
        os.waitpid(child.pid, 0)
        del children[child.pid]
        _answer(child.reply, json.loads(b"".join(chunks)))
        return
    selector.register(child.pidfd, selectors.EVENT_READ, ("exit", child.pid))
    selector.register(child.reply, selectors.EVENT_READ, ("release", child.pid))
    _answer(child.reply, {"pid": child.pid}, close=False)


def _on_exit(child: _Child, selector: Selector, children: dict[int, _Child]) -> None:
    # WNOWAIT: learn the status, leave the zombie (the pid stays reserved until release).
    info = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    if info is None:
        return
    selector.unregister(child.pidfd)
    os.close(child.pidfd)
    child.exited = True
    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
    _answer(child.reply, {"exit": code}, close=False)
    if child.released:
        _reap(child, children)


def _on_release(child: _Child, selector: Selector, children: dict[int, _Child]) -> None:
    with contextlib.suppress(OSError):
        if child.reply.recv(16):
            return  # the supervisor sends nothing but its end: ignore anything else
    selector.unregister(child.reply)
    child.released = True
    if child.exited:
        _reap(child, children)
    else:  # reaped once its exit is seen
        with contextlib.suppress(OSError):
            os.killpg(child.pid, signal.SIGKILL)


def _reap(child: _Child, children: dict[int, _Child]) -> None:
    _, _, usage = os.wait4(child.pid, 0)
    del children[child.pid]
    own = resource.getrusage(resource.RUSAGE_SELF)
    cpu = {"cpu": usage.ru_utime + usage.ru_stime, "launcher_cpu": own.ru_utime + own.ru_stime}
    _answer(child.reply, cpu)


def _stop_all(children: dict[int, _Child]) -> None:
    """The supervisor has gone: SIGKILL every run's process group, reap them all."""
    for pid in children:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # not yet exec'd: it has its own session already
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)  # or it may not, if it was just forked
    for child in list(children.values()):
        os.waitpid(child.pid, 0)
        child.reply.close()
