"""Escape attempts, run as real sandboxed runs (groundloop.execution.sandbox with bubblewrap).

Each attempt is code an adversarial run might write; it prints ESCAPED when a step that must
fail succeeds. Every test asserts the attempt failed and that nothing outside changed: canary
files, this (the "runner") process and a sibling process alive, no process of the run left.
The environment-source class runs the whole protocol (execute) on a tiny environment and
checks its source digest. What the host cannot provide is skipped with the reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from groundloop.execution.bubblewrap import bwrap_error, host_protections
from groundloop.execution.cgroup_memory import memory_cgroup_error
from groundloop.execution.sandbox import MARKER, Limits, allowed_environment, run_sandboxed

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(bwrap_error() is not None, reason=f"no bwrap sandbox: {bwrap_error()}"),
]
SECRET = "sk-escape-canary-4f1c"


class Outside:
    """What a run must never change: canary files next to the workspace, in a stand-in data
    dir and home, the host's /tmp; a sibling process; this process."""

    def __init__(self, tmp_path: Path) -> None:
        self.ws = tmp_path / "ws"
        self.home = tmp_path / "home"
        self.data = tmp_path / "data"
        for d in (self.ws, self.home, self.data):
            d.mkdir()
        self.canaries = {
            tmp_path / "next-to-ws.txt": "canary-next",
            self.data / "store.db": "canary-data",
            Path(os.environ.get("HOME", "/root")) / f".groundloop-canary-{os.getpid()}": "home",
        }
        for path, text in self.canaries.items():
            path.write_text(text)
        self.host_tmp = Path("/tmp") / f"groundloop-escape-{os.getpid()}-{tmp_path.name}"
        # A stand-in for the runner holding a key: /proc/<pid>/environ shows a process's
        # environment as it was exec'd, so the secret is put there at exec.
        self.sibling = subprocess.Popen(["sleep", "120"], env={**os.environ, "API_KEY": SECRET})

    def run(self, code: str, **kwargs):
        env = allowed_environment({}, self.ws / ".home")
        (self.ws / ".home").mkdir(exist_ok=True)
        code = textwrap.dedent(code)
        limits = kwargs.pop("limits", Limits(isolate=True, resident_memory_bytes=1 << 30))
        return run_sandboxed(
            [sys.executable, "-c", code],
            cwd=self.ws,
            env=env,
            wall_seconds=kwargs.pop("wall_seconds", 20),
            grace_seconds=0.5,
            limits=limits,
            **kwargs,
        )

    def check(self, result) -> None:
        assert "ESCAPED" not in result.output_tail, result.output_tail
        assert SECRET not in result.output_tail
        assert result.isolation["sandbox"].startswith("bubblewrap"), result.isolation
        for path, text in self.canaries.items():
            assert path.read_text() == text, f"{path} changed"
        assert not self.host_tmp.exists(), "the run wrote to the host's /tmp"
        assert self.sibling.poll() is None, "a process outside the run was killed"
        assert not leftovers(self.ws), f"processes of the run survive: {leftovers(self.ws)}"

    def close(self) -> None:
        self.sibling.kill()
        self.sibling.wait()
        for path in self.canaries:
            path.unlink(missing_ok=True)


def leftovers(workspace: Path) -> list[int]:
    """Processes of a run in `workspace` (other sessions' runs may be going on)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                marked = MARKER.encode() in Path(f"/proc/{entry.name}/environ").read_bytes()
                if marked and os.readlink(f"/proc/{entry.name}/cwd") == str(workspace):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def outside(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)  # the "runner" holds a secret in its environ
    monkeypatch.setenv("GROUNDLOOP_BROKER_PASSWORD", SECRET)
    box = Outside(tmp_path)
    yield box
    box.close()


def test_protections_are_reported(outside: Outside):
    result = outside.run("print('hello')")
    assert result.returncode == 0 and "hello" in result.output_tail
    for name in ("sandbox", "user", "capabilities", "namespaces", "filesystem", "network"):
        assert not result.isolation[name].startswith("off:"), result.isolation
    assert set(host_protections()) <= set(result.isolation)
    outside.check(result)


# ------------------------------------------------------- 1. other processes: read, trace, signal


def test_cannot_read_the_runners_environment_or_memory(outside: Outside):
    me, sibling = os.getpid(), outside.sibling.pid
    result = outside.run(f"""
        import os, glob
        for path in ["/proc/{sibling}/environ", "/proc/{me}/environ", "/proc/{me}/mem",
                     "/proc/{me}/cmdline", "/proc/1/environ"]:
            try:
                data = open(path, "rb").read(1 << 20)
                if b"{SECRET}" in data or path.endswith("cmdline") and b"pytest" in data:
                    print("ESCAPED read", path)
            except OSError as exc:
                print("refused", path, exc.errno)
        for path in glob.glob("/proc/[0-9]*/environ"):
            try:
                if b"{SECRET}" in open(path, "rb").read():
                    print("ESCAPED scan", path)
            except OSError:
                pass
        print("SECRET" in "".join(os.environ), os.getuid())
    """)
    assert result.returncode == 0, result.output_tail
    outside.check(result)


def test_cannot_ptrace_the_runner(outside: Outside):
    me = os.getpid()
    result = outside.run(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        for pid in ({me}, {outside.sibling.pid}):
            if libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH
                print("ESCAPED ptrace", pid)
        try:
            fd = os.open("/proc/{me}/mem", os.O_RDWR)
            print("ESCAPED opened runner memory")
        except OSError as exc:
            print("refused", exc.errno)
    """)
    outside.check(result)


def test_cannot_signal_the_runner_or_its_siblings(outside: Outside):
    me, sibling = os.getpid(), outside.sibling.pid
    result = outside.run(f"""
        import os, signal
        for pid in ({me}, {sibling}):
            try:
                os.kill(pid, signal.SIGTERM)
                print("ESCAPED signalled", pid)
            except OSError as exc:
                print("refused", pid, exc.errno)
        os.kill(-1, signal.SIGKILL)  # everything this run may signal; never the runner
    """)
    time.sleep(0.2)
    outside.check(result)  # we are alive to check, and so is the sibling


# ------------------------------------------------------------ 2. other namespaces, the network


def test_cannot_join_another_network_namespace(outside: Outside):
    me = os.getpid()
    result = outside.run(f"""
        import ctypes, os, subprocess
        libc = ctypes.CDLL(None, use_errno=True)
        for path in ["/proc/{me}/ns/net", "/proc/1/ns/net", "/proc/{me}/ns/mnt"]:
            try:
                fd = os.open(path, os.O_RDONLY)
                if libc.setns(fd, 0) == 0 and "ns/net" in path and path != "/proc/1/ns/net":
                    print("ESCAPED setns", path)
            except OSError as exc:
                print("refused", path, exc.errno)
        for cmd in (["nsenter", "-t", "{me}", "-n", "true"], ["unshare", "-n", "true"],
                    ["unshare", "-Ur", "true"]):
            try:
                if subprocess.run(cmd, capture_output=True).returncode == 0 and cmd[0] == "nsenter":
                    print("ESCAPED", cmd)
            except OSError as exc:
                print("refused", cmd[0], exc.errno)
        if libc.unshare(0x10000000) == 0:  # CLONE_NEWUSER: a route to new namespaces
            print("ESCAPED unshare(CLONE_NEWUSER)")
    """)
    outside.check(result)


def test_cannot_reach_a_listener_of_the_host(outside: Outside):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    abstract = socket.socket(socket.AF_UNIX)
    name = f"\0groundloop-escape-{os.getpid()}"
    abstract.bind(name)
    abstract.listen()
    try:
        result = outside.run(f"""
            import socket
            for family, address in ((socket.AF_INET, ("127.0.0.1", {port})),
                                    (socket.AF_UNIX, {name!r})):
                s = socket.socket(family)
                s.settimeout(2)
                try:
                    s.connect(address)
                    print("ESCAPED connected", address)
                except OSError as exc:
                    print("refused", exc)
            try:
                socket.create_connection(("1.1.1.1", 53), timeout=2)
                print("ESCAPED internet")
            except OSError as exc:
                print("refused", exc)
        """)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
        abstract.close()
    outside.check(result)


# ---------------------------------------------------------------------- 3. the run's cgroup


def test_cannot_move_into_another_cgroup(outside: Outside):
    result = outside.run("""
        import os, glob, ctypes
        targets = ["/sys/fs/cgroup/cgroup.procs", "/sys/fs/cgroup/unified/cgroup.procs",
                   "/sys/fs/cgroup/memory/cgroup.procs"] + glob.glob("/sys/fs/cgroup/**/cgroup.procs",
                   recursive=True)
        for path in targets:
            try:
                open(path, "w").write(str(os.getpid()))
                print("ESCAPED moved via", path)
            except OSError as exc:
                print("refused", path, exc.errno)
        os.makedirs("/tmp/cg", exist_ok=True)
        libc = ctypes.CDLL(None, use_errno=True)
        for fs in (b"cgroup2", b"cgroup"):
            if libc.mount(fs, b"/tmp/cg", fs, 0, b"memory" if fs == b"cgroup" else None) == 0:
                print("ESCAPED mounted", fs)
    """)
    outside.check(result)


def test_daemon_does_not_outlive_the_run(outside: Outside):
    beacon = outside.ws / "beacon"
    result = outside.run(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for _ in range(100):
                    open({str(beacon)!r}, "a").write("x")
                    time.sleep(0.05)
                os._exit(0)
            os._exit(0)
        time.sleep(0.3)
    """)
    assert result.status == "exited", result
    size = beacon.stat().st_size
    time.sleep(0.5)
    assert beacon.stat().st_size == size, "a daemon of the run still writes"
    outside.check(result)


def test_memory_is_capped_by_the_cgroup_not_rlimit(outside: Outside):
    if memory_cgroup_error():
        pytest.skip(f"no memory cgroup here: {memory_cgroup_error()}")
    result = outside.run(
        """
        import time
        blocks = []
        for _ in range(64):
            blocks.append(bytearray(16 << 20))  # touched: resident
        print("ESCAPED held 1 GiB")
        time.sleep(5)
        """,
        limits=Limits(isolate=True, resident_memory_bytes=256 << 20),
    )
    assert result.returncode != 0, result
    assert result.isolation["limit_hit"].startswith("memory"), result.isolation
    outside.check(result)


# ------------------------------------------------------------- 4. writing outside the workspace


def test_cannot_write_outside_the_workspace(outside: Outside):
    targets = [*outside.canaries, outside.ws.parent / "planted.txt", outside.host_tmp,
               Path("/usr/lib/groundloop-planted"), Path(os.path.expanduser("~/.bashrc"))]  # fmt: skip
    result = outside.run(f"""
        import os
        for path in {[str(t) for t in targets]!r}:
            try:
                with open(path, "w") as f:
                    f.write("pwned")
                if not path.startswith("/tmp/"):
                    print("ESCAPED wrote", path)
            except OSError as exc:
                print("refused", path, exc.errno)
        open("inside.txt", "w").write("fine")  # the workspace itself is writable
    """)
    assert (outside.ws / "inside.txt").read_text() == "fine"
    assert not (outside.ws.parent / "planted.txt").exists()
    assert not Path("/usr/lib/groundloop-planted").exists()
    outside.check(result)


def test_cannot_see_the_runners_files(outside: Outside):
    result = outside.run(f"""
        import os
        for path in ({str(outside.data)!r}, {str(outside.ws.parent)!r}, "/root", "/home",
                     "/etc/shadow", "/var", {str(Path.cwd())!r}):
            try:
                print("listing", path, os.listdir(path)[:3] if os.path.isdir(path) else open(path).read(5))
                if path == {str(outside.data)!r} or path == "/etc/shadow":
                    print("ESCAPED saw", path)
            except OSError as exc:
                print("refused", path, exc.errno)
    """)
    outside.check(result)


def test_symlinks_and_relative_paths_stay_inside(outside: Outside):
    target = next(iter(outside.canaries))
    (outside.ws / "link").symlink_to(target)
    result = outside.run(f"""
        import os
        # The workspace's parents are the run's private /tmp (or a read-only root): these
        # writes may land there, never on the host; check() compares the host's canaries.
        for path in ("link", "../next-to-ws.txt", "../../" * 8 + {str(target)[1:]!r}):
            try:
                open(path, "w").write("pwned")
            except OSError as exc:
                print("refused", path, exc.errno)
        try:
            os.rename("link", "/tmp/x")
        except OSError:
            pass
    """)
    outside.check(result)
