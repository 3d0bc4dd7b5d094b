"""groundloop.execution.sandbox with real processes: environment, output, network, limits, and runaway
code that must end within budget + grace leaving no process behind (checked by PID), under
both containment modes (a cgroup per run where writable, /proc scanning otherwise)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from groundloop.execution.sandbox import (
    Limits,
    _cgroup_parents,
    allowed_environment,
    cancel_on,
    network_isolation_error,
    run_sandboxed,
    sweep_orphaned_runs,
)
from tests.runner_support import alive
from tests.waiting import eventually_sync

pytestmark = pytest.mark.timeout(60)

WALL, GRACE = 1.0, 0.5
HAS_CGROUPS = _cgroup_parents()[0] is not None
HAS_KERNEL_PID_CAP = any(p is not None for p in _cgroup_parents()) and HAS_CGROUPS


def python(tmp_path: Path, code: str, **kwargs):
    env = allowed_environment({}, tmp_path)
    started = time.monotonic()
    result = run_sandboxed(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, **kwargs
    )
    return result, time.monotonic() - started


@pytest.fixture(params=["cgroup", "proc-scan"])
def containment(request, monkeypatch) -> str:
    if request.param == "cgroup" and not HAS_CGROUPS:
        pytest.skip("no writable cgroup2 hierarchy on this machine")
    if request.param == "proc-scan":
        monkeypatch.setenv("GROUNDLOOP_SANDBOX_CGROUPS", "0")
    return request.param


def test_environment_is_allow_listed(monkeypatch, tmp_path: Path):
    for name, value in {
        "OPENAI_API_KEY": "sk-1",
        "MY_SERVICE_TOKEN": "t",
        "DB_PASSWORD": "p",
        "AWS_ACCESS_KEY_ID": "a",
        "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
        "AZURE_CLIENT_SECRET": "z",
        "HF_TOKEN": "hf",
        "GROUNDLOOP_NATS_URL": "nats://x",
        "RANDOM_THING": "r",
        "LC_ALL": "C.UTF-8",
        "CUDA_VISIBLE_DEVICES": "0",
        "OMP_NUM_THREADS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    env = allowed_environment(
        {"GROUNDLOOP_SEED": "3", "GROUNDLOOP_DATA_DIR": "/x", "ANTHROPIC_API_KEY": "sk-2"}, tmp_path
    )
    assert env["HOME"] == str(tmp_path) and env["GROUNDLOOP_SEED"] == "3"
    assert (
        env["LC_ALL"] == "C.UTF-8"
        and env["CUDA_VISIBLE_DEVICES"] == "0"
        and env["OMP_NUM_THREADS"] == "2"
    )
    assert "PATH" in env
    for dropped in (
        "OPENAI_API_KEY",
        "MY_SERVICE_TOKEN",
        "DB_PASSWORD",
        "AWS_ACCESS_KEY_ID",
        "HF_TOKEN",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "AZURE_CLIENT_SECRET",
        "GROUNDLOOP_NATS_URL",
        "RANDOM_THING",
        "GROUNDLOOP_DATA_DIR",
        "ANTHROPIC_API_KEY",
    ):
        assert dropped not in env


def test_output_goes_to_log_callback_and_tail(tmp_path: Path):
    chunks: list[bytes] = []
    result, _ = python(
        tmp_path,
        """
        import os, sys
        print("home", os.environ["HOME"]); print("to stderr", file=sys.stderr); sys.exit(3)
    """,
        wall_seconds=10,
        log_path=tmp_path / "run.log",
        on_output=chunks.append,
    )
    assert result.status == "exited" and result.returncode == 3
    assert f"home {tmp_path}" in result.output_tail and "to stderr" in result.output_tail
    assert b"to stderr" in b"".join(chunks) and "to stderr" in (tmp_path / "run.log").read_text()


def test_no_network_but_loopback(tmp_path: Path):
    result, _ = python(
        tmp_path,
        """
        import socket
        server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
        socket.create_connection(server.getsockname(), timeout=2).close(); print("loopback ok")
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=2); print("OUTSIDE REACHED")
        except OSError as exc:
            print("outside refused", exc)
    """,
        wall_seconds=10,
    )
    why = network_isolation_error()
    if why is None:
        assert result.isolation["network"].startswith("none"), result.isolation
        assert "loopback ok" in result.output_tail and "outside refused" in result.output_tail
    else:
        assert result.isolation["network"] == f"allowed: {why}"
    allowed, _ = python(tmp_path, "print(1)", wall_seconds=10, network=True)
    assert allowed.isolation["network"] == "allowed: requested by caller"


RUNAWAY = {
    "infinite_loop": "while True: pass",
    "ignores_sigterm_with_a_child": """
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pid = os.fork()
        record(os.getpid())
        while True: time.sleep(0.1)
    """,
    "daemonising_grandchild_while_running": """
        import os, signal, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN); record(os.getpid()); time.sleep(600)
            os._exit(0)
        while True: time.sleep(0.1)
    """,
    "daemon_left_after_exit": """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                record(os.getpid()); time.sleep(600)
            os._exit(0)
        time.sleep(0.3)
    """,
}


@pytest.mark.parametrize("name", list(RUNAWAY))
def test_runaway_ends_within_budget_and_nothing_survives(
    name: str, containment: str, tmp_path: Path
):
    pids = tmp_path / "pids"
    prologue = f"import os\ndef record(pid): open({str(pids)!r}, 'a').write(f'{{pid}}\\n')\nrecord(os.getpid())\n"
    result, took = python(
        tmp_path,
        prologue + textwrap.dedent(RUNAWAY[name]),
        wall_seconds=WALL,
        grace_seconds=GRACE,
        limits=Limits(max_processes=16),
    )
    assert took < WALL + GRACE + 1.0, took
    expected = "exited" if name == "daemon_left_after_exit" else "timed_out"
    assert result.status == expected, result
    assert containment in result.isolation["containment"]
    recorded = [int(p) for p in pids.read_text().split()]
    assert len(recorded) >= 2 or name == "infinite_loop"
    assert not [p for p in recorded if alive(p)], f"{recorded} survive: {result}"


def test_fork_bomb_is_capped_and_stopped(containment: str, tmp_path: Path):
    # Exponential where the kernel caps pids; linear where only the watcher does (a watcher
    # polls, and an exponential bomb could take the shared machine down between two polls).
    exponential = containment == "cgroup" and HAS_KERNEL_PID_CAP
    bomb = """
        import os, time
        while True:
            try:
                if os.fork() == 0 and not EXPONENTIAL:
                    time.sleep(600)
            except OSError:
                pass
    """.replace("EXPONENTIAL", str(exponential))
    result, took = python(
        tmp_path, bomb, wall_seconds=WALL, grace_seconds=GRACE, limits=Limits(max_processes=16)
    )
    assert took < WALL + GRACE + 1.0
    assert result.status in ("timed_out", "killed")
    assert "processes" in result.isolation.get("limit_hit", ""), result.isolation
    cgroup = result.isolation["containment"].split(" ", 1)[-1]
    assert not Path(cgroup).exists() or containment != "cgroup", "run cgroup left behind"


def test_memory_and_file_size_limits_are_enforced_and_recorded(tmp_path: Path):
    hog, _ = python(
        tmp_path,
        "x = [bytes(2**30) for _ in range(32)]",
        wall_seconds=10,
        limits=Limits(memory_bytes=1 << 30),
    )
    assert hog.status == "exited" and hog.returncode != 0 and "MemoryError" in hog.output_tail
    assert (
        hog.isolation["limit_hit"].startswith("memory")
        and hog.isolation["memory"] == f"RLIMIT_AS={1 << 30}"
    )
    big, _ = python(
        tmp_path,
        "open('big', 'wb').write(b'x' * (4 << 20))",
        wall_seconds=10,
        limits=Limits(file_size_bytes=1 << 20),
    )
    assert big.returncode != 0 and big.isolation["limit_hit"].startswith("file_size")
    assert (tmp_path / "big").stat().st_size <= 1 << 20


def test_cancel_stops_a_run_like_a_timeout(tmp_path: Path):
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with cancel_on(stop):
        result, took = python(
            tmp_path, "import time; time.sleep(60)", wall_seconds=30, grace_seconds=GRACE
        )
        after, _ = python(tmp_path, "print('never')", wall_seconds=30)
    assert result.status == "killed" and took < 0.3 + GRACE + 1.0
    assert after.status == "killed" and "never" not in after.output_tail


@pytest.mark.skipif(not HAS_CGROUPS, reason="sweeping needs run cgroups")
def test_runs_of_a_killed_supervisor_are_swept(tmp_path: Path):
    pids = tmp_path / "pids"
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, textwrap
        from pathlib import Path
        from groundloop.execution.sandbox import allowed_environment, run_sandboxed
        code = textwrap.dedent('''
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    open({str(pids)!r}, "a").write(f"{{os.getpid()}}\\\\n"); time.sleep(600)
                os._exit(0)
            open({str(pids)!r}, "a").write(f"{{os.getpid()}}\\\\n"); time.sleep(600)
        ''')
        run_sandboxed([sys.executable, "-c", code], cwd=Path({str(tmp_path)!r}),
                      env=allowed_environment({{}}, Path({str(tmp_path)!r})), wall_seconds=600)
    """),
        ]
    )
    eventually_sync(
        lambda: pids.exists() and len(pids.read_text().split()) >= 2,
        timeout=20,
        what="both sandboxed processes recording their pids",
    )
    recorded = [int(p) for p in pids.read_text().split()]
    os.kill(supervisor.pid, signal.SIGKILL)
    supervisor.wait()
    assert sweep_orphaned_runs() >= 1
    assert not [p for p in recorded if alive(p)]
