"""How sandboxed runs are started and what they leave: the launcher process
(groundloop.execution.launcher) that forks in place of the supervising process, the fallback
that forks this process, the reuse of clean run cgroups (groundloop.execution.cgroup_pool),
and a Cancellation that wakes a run at once. Real processes throughout; a run's processes are
checked by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from groundloop.execution import launcher
from groundloop.execution.cgroup_memory import memory_cgroup_error, memory_parent
from groundloop.execution.process_tree import _mount_points
from groundloop.execution.sandbox import (
    Cancellation,
    Limits,
    _cgroup_parents,
    allowed_environment,
    cancel_on,
    run_sandboxed,
    sweep_orphaned_runs,
)
from tests.runner_support import alive
from tests.waiting import eventually_sync

pytestmark = pytest.mark.timeout(60)

HAS_CGROUPS = _cgroup_parents()[0] is not None


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def python(tmp_path: Path, code: str, **kwargs):
    kwargs.setdefault("wall_seconds", 20)
    return run_sandboxed(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=allowed_environment({}, tmp_path),
        **kwargs,
    )


@pytest.fixture(params=["launcher", "fork-here"])
def start_mode(request, monkeypatch) -> str:
    if request.param == "fork-here":
        monkeypatch.setenv("GROUNDLOOP_SANDBOX_LAUNCHER", "0")
    return request.param


def test_runs_are_forked_by_the_launcher_not_by_this_process(start_mode: str, tmp_path: Path):
    result = python(tmp_path, "import os; print('parent', os.getppid())")
    assert result.status == "exited" and result.returncode == 0, result
    parent = int(result.output_tail.split("parent")[1].split()[0])
    if start_mode == "fork-here":
        assert parent == os.getpid()
    else:
        assert parent != os.getpid() and parent_of(parent) == os.getpid()


def test_a_runaway_with_a_daemon_ends_within_budget_either_way(start_mode: str, tmp_path: Path):
    pids = tmp_path / "pids"
    result = python(
        tmp_path,
        f"""
        import os, signal, time
        def record(pid): open({str(pids)!r}, "a").write(f"{{pid}}\\n")
        record(os.getpid())
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN); record(os.getpid()); time.sleep(600)
            os._exit(0)
        print("running", flush=True)
        while True: time.sleep(0.1)
        """,
        wall_seconds=1.0,
        grace_seconds=0.5,
        limits=Limits(max_processes=16),
    )
    assert result.status == "timed_out" and "running" in result.output_tail, result
    recorded = [int(p) for p in pids.read_text().split()]
    assert len(recorded) == 2 and not [p for p in recorded if alive(p)], recorded


def test_what_cannot_start_raises_as_popen_would(start_mode: str, tmp_path: Path):
    env = allowed_environment({}, tmp_path)
    with pytest.raises(FileNotFoundError):
        run_sandboxed([str(tmp_path / "no-such-program")], cwd=tmp_path, env=env, wall_seconds=5)
    with pytest.raises(FileNotFoundError):
        run_sandboxed(["/bin/true"], cwd=tmp_path / "no-such-dir", env=env, wall_seconds=5)
    assert python(tmp_path, "print('still fine')").returncode == 0  # nothing was left broken


def test_a_killed_launcher_ends_its_runs_and_is_replaced(tmp_path: Path):
    started = tmp_path / "started"
    outcome: list = []
    worker = threading.Thread(
        target=lambda: outcome.append(
            python(
                tmp_path,
                f"import os, time; open({str(started)!r}, 'w').write(str(os.getpid())); "
                "time.sleep(600)",
            )
        )
    )
    worker.start()
    eventually_sync(started.exists, timeout=20, what="the run starting")
    run_pid = int(started.read_text())
    os.kill(parent_of(run_pid), signal.SIGKILL)  # the launcher
    worker.join(30)
    [result] = outcome
    assert result.status == "killed" and result.returncode == -signal.SIGKILL, result
    assert not alive(run_pid)
    again = python(tmp_path, "import os; print('parent', os.getppid())")
    assert again.returncode == 0 and int(again.output_tail.split()[1]) != os.getpid()


SUPERVISOR = """
import sys
from pathlib import Path
from groundloop.execution.sandbox import allowed_environment, run_sandboxed
ws = Path(sys.argv[1])
code = "import os, time; open('leader', 'w').write(str(os.getpid())); time.sleep(600)"
run_sandboxed([sys.executable, "-c", code], cwd=ws, env=allowed_environment({}, ws),
              wall_seconds=600)
"""


def test_the_launcher_and_its_runs_end_with_a_killed_supervisor(tmp_path: Path):
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path)])
    leader = tmp_path / "leader"
    eventually_sync(leader.exists, timeout=30, what="the supervised run starting")
    run_pid = int(leader.read_text())
    launcher_pid = parent_of(run_pid)
    assert parent_of(launcher_pid) == supervisor.pid
    os.kill(supervisor.pid, signal.SIGKILL)
    supervisor.wait()
    eventually_sync(
        lambda: not alive(run_pid) and not alive(launcher_pid),
        timeout=10,
        what="the launcher and the run ending with their supervisor",
    )
    sweep_orphaned_runs()  # the dead supervisor's run cgroups


def test_a_cancellation_wakes_the_run_at_once(tmp_path: Path):
    stop = Cancellation()
    threading.Timer(0.3, stop.set).start()
    with cancel_on(stop):
        result = python(tmp_path, "import time; time.sleep(60)", wall_seconds=30, grace_seconds=0.5)
        after = python(tmp_path, "print('never')")
    assert result.status == "killed" and result.isolation["cancelled"], result
    assert after.status == "killed" and "never" not in after.output_tail


def test_runaway_output_is_kept_whole_in_the_log(start_mode: str, tmp_path: Path):
    log = tmp_path / "run.log"
    chunks: list[bytes] = []
    result = python(
        tmp_path,
        "import sys\nfor i in range(20000): print(f'line {i}')\nsys.exit(4)",
        log_path=log,
        on_output=chunks.append,
    )
    assert result.returncode == 4
    lines = log.read_text().splitlines()
    assert lines[0] == "line 0" and lines[-1] == "line 19999" and len(lines) == 20000
    assert b"".join(chunks).decode().splitlines() == lines
    assert result.output_tail.endswith("line 19999\n")


# ------------------------------------------------------------------ reused run cgroups


def cgroup_of(result) -> Path:
    return Path(result.isolation["containment"].split(" ", 1)[1])


NEEDS_CGROUPS = pytest.mark.skipif(not HAS_CGROUPS, reason="no writable cgroup2 hierarchy")
LIMITS = Limits(max_processes=16)


@NEEDS_CGROUPS
def test_a_clean_runs_cgroups_serve_the_next_run(tmp_path: Path):
    first = python(tmp_path, "print('one')", limits=LIMITS)
    second = python(tmp_path, "print('two')", limits=LIMITS)
    assert cgroup_of(first) == cgroup_of(second) and cgroup_of(second).is_dir()
    assert second.returncode == 0 and "limit_hit" not in second.isolation


@NEEDS_CGROUPS
@pytest.mark.skipif(os.geteuid() != 0, reason="a plain run makes a cgroup only as root")
def test_a_cgroup_holding_a_child_cgroup_is_not_handed_on(tmp_path: Path):
    mount = str(_mount_points("cgroup2")[0][0])
    nested = python(
        tmp_path,
        f"""
        import os
        mine = [l.split(":", 2)[2] for l in open("/proc/self/cgroup") if l.startswith("0::")][0]
        os.mkdir({mount!r} + mine.strip() + "/planted")
        """,
        limits=LIMITS,
    )
    assert nested.returncode == 0, nested.output_tail
    after = python(tmp_path, "print('three')", limits=LIMITS)
    assert cgroup_of(after) != cgroup_of(nested)
    (cgroup_of(nested) / "planted").rmdir()
    cgroup_of(nested).rmdir()


@NEEDS_CGROUPS
def test_a_run_that_hit_its_process_cap_leaves_no_cgroup_behind(tmp_path: Path):
    python(tmp_path, "print('warm')", limits=LIMITS)  # an idle cgroup for the bomb to take
    bomb = python(
        tmp_path,
        "import os, time\nwhile True:\n    try:\n        os.fork() or time.sleep(600)\n"
        "    except OSError:\n        pass",
        limits=LIMITS,
        wall_seconds=1.0,
        grace_seconds=0.2,
    )
    assert "processes" in bomb.isolation.get("limit_hit", ""), bomb.isolation
    assert not cgroup_of(bomb).exists()
    assert cgroup_of(python(tmp_path, "pass", limits=LIMITS)) != cgroup_of(bomb)


@pytest.mark.skipif(memory_cgroup_error() is not None, reason=f"{memory_cgroup_error()}")
def test_a_reused_memory_cgroup_still_caps_and_reports_only_its_own_run(tmp_path: Path):
    limits = Limits(resident_memory_bytes=256 << 20)
    fine = python(tmp_path, "print('small')", limits=limits)
    assert fine.returncode == 0 and "limit_hit" not in fine.isolation
    hog = python(tmp_path, "x = [bytearray(16 << 20) for _ in range(64)]", limits=limits)
    assert hog.returncode != 0 and hog.isolation["limit_hit"].startswith("memory"), hog
    again = python(tmp_path, "print('small again')", limits=limits)
    assert again.returncode == 0 and "limit_hit" not in again.isolation, again.isolation


TAMPER = """
import os
for line in open("/proc/self/cgroup"):
    _, controllers, path = line.strip().split(":", 2)
    if ("memory" in controllers.split(",")) == {v1!r}:
        own = {mount!r} + path
        break
names = ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"] if {v1!r} else ["memory.max"]
for name in names:  # memsw first: v1 keeps the memory limit at or below it
    if os.path.exists(os.path.join(own, name)):
        with open(os.path.join(own, name), "w") as limit:
            limit.write("-1" if {v1!r} else "max")
print("raised", own, open(os.path.join(own, names[-1])).read())
"""


@pytest.mark.skipif(memory_cgroup_error() is not None, reason=f"{memory_cgroup_error()}")
@pytest.mark.skipif(os.geteuid() != 0, reason="a plain run changes its cgroup only as root")
def test_a_limit_a_run_raised_on_its_own_cgroup_does_not_carry_over(tmp_path: Path):
    limits = Limits(resident_memory_bytes=256 << 20)
    parent = memory_parent()
    assert parent is not None
    v1 = not (parent / "cgroup.controllers").exists()
    mounts = _mount_points("cgroup") if v1 else _mount_points("cgroup2")
    mount = next(str(m) for m, options in mounts if not v1 or "memory" in options.split(","))
    tamper = python(tmp_path, TAMPER.format(v1=v1, mount=mount), limits=limits)
    assert tamper.returncode == 0 and "raised" in tamper.output_tail, tamper.output_tail
    hog = python(tmp_path, "x = [bytearray(16 << 20) for _ in range(64)]", limits=limits)
    assert hog.returncode != 0 and hog.isolation["limit_hit"].startswith("memory"), hog


IDLE_CGROUPS = """
import sys
from pathlib import Path
from groundloop.execution.sandbox import Limits, allowed_environment, run_sandboxed
ws = Path(sys.argv[1])
r = run_sandboxed([sys.executable, "-c", "pass"], cwd=ws, env=allowed_environment({}, ws),
                  wall_seconds=20, limits=Limits(max_processes=8, resident_memory_bytes=1 << 28))
print(r.isolation["containment"].split(" ", 1)[1], flush=True)
sys.stdin.read()  # held until killed: its idle cgroups are left to the sweep
"""


@pytest.mark.skipif(not HAS_CGROUPS, reason="sweeping needs run cgroups")
def test_idle_cgroups_of_a_killed_supervisor_are_swept(tmp_path: Path):
    holder = subprocess.Popen(
        [sys.executable, "-c", IDLE_CGROUPS, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    idle = Path(holder.stdout.readline().strip())
    assert idle.is_dir()
    owner = idle.name.split("-")[1]
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert sweep_orphaned_runs() >= 1
    assert not idle.exists()
    for parent in (*_cgroup_parents(), memory_parent()):
        if parent is not None:
            assert not [p for p in parent.iterdir() if f"-{owner}-" in p.name], parent


def test_children_cpu_is_reported(tmp_path: Path):
    before = launcher.children_cpu_seconds()[0]
    python(tmp_path, "sum(range(3_000_000))")
    assert launcher.children_cpu_seconds()[0] > before
