"""Budget guard (protected): runs training as a child and owns its compute budget.

    python budget_guard.py --cpu-seconds 95 --hooks data --output out/ckpt.pt -- python train.py
    python budget_guard.py --wall-seconds 1500 --wall-seconds-env NANOGPT_TRAIN_SECONDS \
        --save-seconds 30 --output out/model.pt -- python -m torch.distributed.run ... train.py

The manifest's entrypoint starts this process, never train.py directly. It:
- makes itself non-dumpable (no ptrace, no /proc/<pid>/mem for same-user processes), so
  nothing training runs can read or rewrite the counters below;
- becomes a child subreaper, so every process training starts (double forks and setsid()
  included) stays its descendant, is counted and is killed when training ends;
- counts CPU seconds of the whole training tree (live processes from /proc, exited ones from
  wait4) and kills the tree once --cpu-seconds is spent: extra threads or processes buy no
  extra compute, they only spend the same budget faster;
- owns the clock when --wall-seconds is given: the training tree must have exited within
  wall + --save-seconds seconds of its launch, measured here, or the guard kills it and
  records `exceeded`. --wall-seconds-env names a variable of the guard's own environment (set
  by the operator, never by training) that overrides the wall seconds. Training is told the
  deadline as absolute CLOCK_MONOTONIC seconds (GROUNDLOOP_GUARD_DEADLINE, and
  GROUNDLOOP_GUARD_TRAIN_DEADLINE = the deadline less the save seconds), so an honest harness
  stops in time; ignoring them, or patching its own clocks, changes nothing here;
- when --hooks names a protected module with `serve(sock, seed, smoke) -> dict`, runs it in a
  thread here, on one end of a socket pair whose other end the child gets as
  GROUNDLOOP_DATA_FD (the data is served, and its budget cut, in this process); and when that
  module has `unreadable_paths() -> list[Path]`, starts the child under a Landlock ruleset
  that denies reading those files (the corpus), so the served stream is the only way in;
- after the whole tree is dead, writes out/budget_ledger.json: CPU and wall seconds, what
  the hooks counted, the sha256 of each --output (a folder hashes every file in it, by
  relative path), and `exceeded` (the reason, or null). Only
  this process writes it, last, when nothing of training is left running to rewrite it; the
  protected evaluation reads it before it loads any editable code and rejects a run whose
  ledger is missing, over budget, or does not match the checkpoint it is about to score.
Exits with the child's exit code (0 when it was stopped for exceeding the budget, so the
evaluation can reject the run with the reason).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import importlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

LEDGER = Path("out/budget_ledger.json")
POLL_SECONDS = 0.1
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 4, 38, 36
# Landlock (Linux >= 5.13): the same syscall numbers on every architecture.
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
LANDLOCK_ACCESS_FS_READ_FILE = 1 << 2
LANDLOCK_RULE_PATH_BENEATH = 1
TICKS = os.sysconf("SC_CLK_TCK")

_libc = ctypes.CDLL(None, use_errno=True)


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_ruleset(unreadable: list[Path]) -> int | None:
    """A ruleset fd granting READ_FILE everywhere except on `unreadable` files; None when the
    kernel has no Landlock (the guard then records "landlock": "unavailable")."""
    if not unreadable:
        return None
    attr = ctypes.c_uint64(LANDLOCK_ACCESS_FS_READ_FILE)
    fd = _libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if fd < 0:
        return None
    denied = {p.resolve() for p in unreadable if p.exists()}
    ancestors = {a for p in denied for a in p.parents}

    def grant(path: Path) -> None:
        try:
            target = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        try:
            rule = _PathBeneath(LANDLOCK_ACCESS_FS_READ_FILE, target)
            # A non-directory takes file rights only; an unsupported file type is just skipped.
            _libc.syscall(SYS_ADD_RULE, fd, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0)
        finally:
            os.close(target)

    def walk(directory: Path) -> None:
        for entry in os.scandir(directory):
            path = Path(entry.path)
            real = path.resolve()
            if real in denied or real in ancestors:
                if real in ancestors and not entry.is_symlink():
                    walk(path)  # reached through its real path, never through a link
                continue
            grant(real)

    walk(Path("/"))
    return fd


def _preexec(ruleset: int | None):
    def setup() -> None:
        if ruleset is not None:
            if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
            if _libc.syscall(SYS_RESTRICT_SELF, ruleset, 0) != 0:
                raise OSError(ctypes.get_errno(), "landlock_restrict_self")
            os.close(ruleset)

    return setup


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and of its reaped children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), sum(int(v) for v in fields[11:15]) / TICKS


def descendants(root: int) -> dict[int, float]:
    """Every live (or zombie) descendant of `root` with its CPU seconds."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (found := _stat(int(name))):
            table[int(name)] = found
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    result, stack = {}, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        result[pid] = table[pid][1]
        stack.extend(children.get(pid, []))
    return result


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def sha256(path: Path) -> str | None:
    """Digest of a file, or of a folder's files with their relative paths; None if absent.
    Links are hashed as their target path, so a link cannot point the evaluation elsewhere."""
    if path.is_symlink():
        return "link:" + os.readlink(path)
    if path.is_file():
        return _file_sha256(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")):
        relative = item.relative_to(path).as_posix()
        if item.is_symlink():
            digest.update(f"L {relative} {os.readlink(item)}\n".encode())
        elif item.is_file():
            digest.update(f"F {relative} {_file_sha256(item)}\n".encode())
        elif item.is_dir():
            digest.update(f"D {relative}\n".encode())
    return digest.hexdigest()


def wall_budget(seconds: float | None, variable: str | None) -> float | None:
    """--wall-seconds, or the operator's override from this process's own environment."""
    raw = os.environ.get(variable) if variable else None
    if not raw:
        return seconds
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SystemExit(f"budget_guard: {variable}={raw!r} must be a positive number of seconds")
    return value


class Guard:
    def __init__(self, cpu_seconds: float | None, deadline: float | None = None) -> None:
        self.cpu_budget = math.inf if cpu_seconds is None else cpu_seconds
        self.deadline = math.inf if deadline is None else deadline  # time.monotonic()
        self.wall_text = ""
        self.reaped_cpu = 0.0
        self.exceeded: str | None = None
        self.child_status: int | None = None
        self.child = -1

    def reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.reaped_cpu += usage.ru_utime + usage.ru_stime
            if pid == self.child:
                self.child_status = status

    def cpu_now(self) -> float:
        return self.reaped_cpu + sum(descendants(os.getpid()).values())

    def kill_tree(self) -> None:
        for _ in range(100):
            alive = descendants(os.getpid())
            if not alive:
                return
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
            self.reap()

    def run(self, command: list[str], ruleset: int | None, fds: tuple[int, ...], env) -> None:
        proc = subprocess.Popen(command, pass_fds=fds, env=env, preexec_fn=_preexec(ruleset))
        self.child = proc.pid
        while self.child_status is None:
            time.sleep(POLL_SECONDS)
            self.reap()
            if self.exceeded is not None:
                continue
            used = self.cpu_now() if math.isfinite(self.cpu_budget) else 0.0
            if used > self.cpu_budget:
                self.exceeded = (
                    f"training used {used:.1f} CPU seconds, over its budget of "
                    f"{self.cpu_budget:g} (all threads and processes of the run count)"
                )
                self.kill_tree()
            elif time.monotonic() > self.deadline:
                self.exceeded = (
                    f"training was still running at its wall-clock deadline ({self.wall_text}, "
                    "counted by the protected guard from launch); it was stopped"
                )
                self.kill_tree()
        self.kill_tree()  # whatever training left behind dies before the ledger is written
        proc.returncode = os.waitstatus_to_exitcode(self.child_status)
        self.returncode = proc.returncode


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-seconds", type=float, help="CPU seconds of the training tree")
    parser.add_argument("--wall-seconds", type=float, help="wall seconds of training")
    parser.add_argument("--wall-seconds-env", help="variable overriding --wall-seconds")
    parser.add_argument("--save-seconds", type=float, default=0.0, help="added for saving")
    parser.add_argument("--hooks", help="protected module with serve() / unreadable_paths()")
    parser.add_argument("--output", action="append", default=[], help="file to fingerprint")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the training command after --")
    if args.cpu_seconds is None and args.wall_seconds is None:
        parser.error("give --cpu-seconds, --wall-seconds or both")
    if command[0] == "python":
        command = [sys.executable, *command[1:]]
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    LEDGER.unlink(missing_ok=True)
    smoke = os.environ.get("GROUNDLOOP_SMOKE") == "1" or "--smoke" in command
    seed = int(os.environ.get("GROUNDLOOP_SEED", "0"))
    hooks = importlib.import_module(args.hooks) if args.hooks else None
    env, fds, served, ruleset = dict(os.environ), (), {}, None
    server = None
    if hooks is not None and hasattr(hooks, "unreadable_paths"):
        ruleset = landlock_ruleset(hooks.unreadable_paths())
    if hooks is not None and hasattr(hooks, "serve"):
        mine, theirs = socket.socketpair()
        env["GROUNDLOOP_DATA_FD"] = str(theirs.fileno())
        fds = (theirs.fileno(),)

        def serve() -> None:
            try:
                served.update(hooks.serve(mine, seed, smoke))
            finally:
                mine.close()  # training sees the end of its data, never a hang

        server = threading.Thread(target=serve, daemon=True)
        server.start()
    if ruleset is not None:
        fds = (*fds, ruleset)
    wall = wall_budget(args.wall_seconds, args.wall_seconds_env)
    started = time.monotonic()
    deadline = None if wall is None else started + wall + args.save_seconds
    if deadline is not None:
        env["GROUNDLOOP_GUARD_DEADLINE"] = repr(deadline)
        env["GROUNDLOOP_GUARD_TRAIN_DEADLINE"] = repr(deadline - args.save_seconds)
    guard = Guard(args.cpu_seconds, deadline)
    if wall is not None:
        guard.wall_text = f"{wall:g} s + {args.save_seconds:g} s to save"
    guard.run(command, ruleset, fds, env)
    wall_used = time.monotonic() - started
    if server is not None:
        theirs.close()
        server.join(timeout=5)
        if served.get("exceeded") and guard.exceeded is None:
            guard.exceeded = served["exceeded"]
    ledger = {
        "cpu_seconds": round(guard.reaped_cpu, 3),
        "cpu_budget": args.cpu_seconds,
        "wall_seconds": round(wall_used, 3),
        "wall_budget": None if wall is None else wall + args.save_seconds,
        "served": {k: v for k, v in served.items() if k != "exceeded"},
        "landlock": "unneeded"
        if hooks is None or not hasattr(hooks, "unreadable_paths")
        else "enforced"
        if ruleset is not None
        else "unavailable",
        "outputs": {name: sha256(Path(name)) for name in args.output},
        "exceeded": guard.exceeded,
        "returncode": guard.returncode,
    }
    LEDGER.parent.mkdir(exist_ok=True)
    tmp = LEDGER.with_name(f".ledger-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.write_text(json.dumps(ledger, indent=2, sort_keys=True))
    tmp.replace(LEDGER)
    print(f"budget_guard: {json.dumps(ledger, sort_keys=True)}", flush=True)
    return 0 if guard.exceeded else guard.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
