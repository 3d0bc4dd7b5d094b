"""Least privilege for sandboxed runs, by construction: each run inside bubblewrap (`bwrap`).

Generated code is adversarial (reward hacking is a finding of the paper). A run wrapped here:

- runs as an unprivileged user: when the runner is root, a dedicated uid (`Limits.run_uid`,
  default 65534 "nobody"; the runner may give each slot its own) set between fork and exec;
  otherwise the runner's own unprivileged uid. Either way inside a user namespace, with every
  capability dropped and no_new_privs (bwrap sets it), and no nested user namespaces;
- in its own PID, mount, network, IPC, UTS and cgroup namespaces (`--unshare-all`): it sees
  and can signal only its own processes, has only loopback, and dies with its supervisor;
- on a filesystem built from nothing (a tmpfs root): the system directories (/usr, /lib*,
  /bin, a few /etc files) and the interpreter (prefix, venv, import path) read-only, its
  workspace, run directory and cache writable, a private /tmp; nothing else exists for it:
  not the runner's home, the data dir or store, the broker's files, the environment's
  source folder (a run gets a copy, the workspace), or other runs' workspaces.

Why bwrap and not hand-rolled unshare/mount/capset calls: it is maintained (Flatpak's
sandbox, in Debian as `bubblewrap`), it gets the fiddly, security-relevant ordering right
(user namespace maps, pivot_root onto a fresh tmpfs, mount propagation, dropping the
bounding set, PR_SET_NO_NEW_PRIVS, fd hygiene, pid 1 reaping, --die-with-parent) and its
failure modes are documented; reimplementing that here in Python between fork and exec
would be a second, less reviewed copy of the same code. Paths are handed to bwrap as file
descriptors opened by the runner (`--ro-bind-fd`), so the unprivileged run uid never needs
to traverse the runner's directories (e.g. an interpreter under /root).

`host_protections()` probes this host once and says exactly which protections a run gets;
`isolation_gaps()` lists those missing. The sandbox records them per run, and refuses to run
with gaps when asked to (`Limits.require_full_isolation`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from groundloop.execution.cgroup_memory import memory_cgroup_error
from groundloop.execution.process_tree import _cgroup_parents

DEFAULT_RUN_UID = 65534
OFF = "off: "  # every protection that is not in force reads "off: <why>"
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC = (
    "passwd", "group", "hosts", "nsswitch.conf", "host.conf", "ld.so.cache", "ld.so.conf",
    "ld.so.conf.d", "localtime", "alternatives", "ssl", "ca-certificates", "mime.types",
)  # fmt: skip
_NETWORK_ETC = ("resolv.conf", "gai.conf")


class IsolationUnavailable(RuntimeError):
    """Full isolation was required and this host cannot provide it; the message says what."""


@dataclass
class Wrapped:
    """How to start one run: `argv` for Popen, fds to pass (and close after), uid to drop to."""

    argv: list[str]
    fds: list[int]
    uid: int | None
    user: str = ""  # set when this run's uid differs from the host's default (bwrap_mode)
    # The argv positions that name `fds`, in order: a launcher renumbers them to its copies.
    fd_args: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


@functools.cache  # looked up per run otherwise; bwrap_mode caches what it found anyway
def bwrap_path() -> str | None:
    return shutil.which("bwrap") or (
        "/usr/bin/bwrap" if os.access("/usr/bin/bwrap", os.X_OK) else None
    )


@functools.cache
def interpreter_paths() -> tuple[Path, ...]:
    """What the runner's Python needs to start and import its packages (read-only for runs):
    its prefixes and the import path a fresh interpreter gets (site-packages, editable
    installs, PYTHONPATH). Not this process's sys.path: test runners and tools insert their
    working directories there, which may hold anything."""
    found = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)}
    found.add(Path(os.path.realpath(sys.executable)).parent)
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        out = subprocess.run(
            [sys.executable, "-c", "import sys; print('\\n'.join(sys.path[1:]))"],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        found |= {Path(line) for line in out.splitlines() if os.path.isabs(line)}
    return tuple(sorted(p for p in found if p.exists()))


def _gpu_devices() -> list[str]:
    with contextlib.suppress(OSError):
        return sorted(f"/dev/{n}" for n in os.listdir("/dev") if n.startswith(("nvidia", "dri")))
    return []


def wrap(
    cmd: list[str],
    *,
    cwd: Path,
    writable: Iterable[Path],
    readable: Iterable[Path] = (),
    network: bool = False,
    run_uid: int | None = DEFAULT_RUN_UID,
    mode: str | None = None,
) -> Wrapped:
    """The bwrap command line that runs `cmd` in `cwd` (writable), with `writable` and
    `readable` (plus the interpreter) mounted at their own paths and nothing else.

    Modes (default: the strongest this host allows, see `bwrap_mode`): "drop" (root runner:
    become `run_uid` before bwrap, a real unprivileged uid outside too), "map" (root runner
    whose interpreter `run_uid` cannot reach, e.g. under /root: bwrap as root maps `run_uid`
    inside to the runner outside, no capabilities), "own" (non-root runner: its own uid)."""
    mode = mode or bwrap_mode(run_uid)[0]
    binary = bwrap_path()
    if binary is None:
        raise IsolationUnavailable("bwrap is not installed (apt-get install bubblewrap)")
    argv = [
        binary,
        "--unshare-all",
        "--unshare-user",
        "--die-with-parent",
        "--new-session",
        "--disable-userns",
    ]
    argv += ["--share-net"] if network else []
    argv += ["--hostname", "groundloop-run", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    argv += ["--tmpfs", "/dev/shm"]  # private shared memory: DataLoader workers, NCCL
    fds: list[int] = []
    fd_args: list[int] = []
    links, host_paths = _host_binds(network)
    argv += links
    binds = dict.fromkeys(host_paths, "--ro-bind-fd")  # path -> "--bind-fd" | "--ro-bind-fd"

    def add(path: Path | str, option: str) -> None:
        path = os.path.realpath(path)
        if os.path.exists(path) and binds.get(path) != "--bind-fd":
            binds[path] = option

    for path in readable:
        add(path, "--ro-bind-fd")
    if Path(cmd[0]).is_absolute():
        add(Path(cmd[0]).parent, "--ro-bind-fd")
    for path in [cwd, *writable]:
        add(path, "--bind-fd")
    user = ""
    if mode == "drop" and run_uid is not None:
        unreachable = [p for p in binds if not _reachable(p, run_uid)]
        if unreachable:  # bwrap, as the run uid, must walk to each path it mounts
            mode = "map"
            user = (
                f"uid {run_uid} inside a user namespace, mapped to the runner's uid 0 outside "
                f"(uid {run_uid} cannot reach {unreachable[0]}: make its parents "
                "world-searchable (o+x) to run as that uid outside too)"
            )
    try:
        for path in sorted(binds, key=lambda p: (p.count("/"), p)):  # parents first
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                if path in host_paths:  # gone since it was resolved: as if it never existed
                    continue
                raise
            fds.append(fd)
            fd_args.append(len(argv) + 1)
            argv += [binds[path], str(fd), path]
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    if gpus := _gpu_devices():  # CUDA needs its device nodes and reads PCI topology from /sys
        for dev in gpus:
            argv += ["--dev-bind", dev, dev]
        argv += ["--ro-bind", "/sys", "/sys"]
    if mode == "map" and run_uid is not None:
        argv += ["--uid", str(run_uid), "--gid", str(run_uid)]
    # The tmpfs root (and the parents bwrap made for the mounts) read-only: writes go to the
    # writable mounts and /tmp or fail, never to a scratch root a later step might trust.
    argv += ["--remount-ro", "/"]
    argv += ["--setenv", "TMPDIR", "/tmp", "--chdir", str(os.path.realpath(cwd)), "--", *cmd]
    return Wrapped(argv, fds, run_uid if mode == "drop" else None, user, fd_args)


@functools.cache
def _host_binds(network: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(bwrap's --symlink arguments, the real paths to mount read-only) for what every run
    gets: the system directories, a few /etc files, the interpreter. Resolved once per
    process (a realpath each, per run, was most of `wrap`'s time); one that vanishes later is
    skipped when it is opened, as it would have been here."""
    links: list[str] = []
    paths: dict[str, None] = {}
    for top in _SYSTEM:
        if os.path.islink(top):
            links += ["--symlink", os.readlink(top), top]
        else:
            paths[os.path.realpath(top)] = None
    for name in _ETC + (_NETWORK_ETC if network else ()):
        paths[os.path.realpath(f"/etc/{name}")] = None
    for path in interpreter_paths():
        paths[os.path.realpath(path)] = None
    return tuple(links), tuple(p for p in paths if os.path.exists(p))


def _reachable(path: str, uid: int) -> bool:
    """Whether `uid` (with gid `uid` and no groups) may search every parent of `path`."""
    parent = os.path.dirname(path)
    while parent not in ("/", ""):
        try:
            st = os.stat(parent)
        except OSError:
            return False
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == uid else 0o001
        if not st.st_mode & bit:
            return False
        parent = os.path.dirname(parent)
    return True


def drop_to(uid: int) -> None:
    """Between fork and exec (as root): become `uid` with its own gid and no groups."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def hand_over(paths: Iterable[Path], uid: int, *, recursive: Iterable[Path] = ()) -> None:
    """Make `paths` (and every file under `recursive`) the run uid's, so it can write there
    and nowhere else; the runner, as root, still reads and removes them afterwards."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chown(path, uid, uid, follow_symlinks=False)
    for root in recursive:
        os.chown(root, uid, uid, follow_symlinks=False)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


def _probe(run_uid: int | None, mode: str) -> str | None:
    with tempfile.TemporaryDirectory(prefix="groundloop-bwrap-probe-") as scratch:
        try:
            wrapped = wrap([sys.executable, "-c", "pass"], cwd=Path(scratch), writable=[],
                           run_uid=run_uid, mode=mode)  # fmt: skip
            if wrapped.user:  # "drop" fell back to "map": the interpreter is out of reach
                wrapped.close()
                return wrapped.user[wrapped.user.index("(uid") + 1 : wrapped.user.index(":")]
            uid = wrapped.uid
            if uid is not None:
                hand_over([Path(scratch)], uid)
            result = subprocess.run(
                wrapped.argv,
                pass_fds=wrapped.fds,
                preexec_fn=(lambda: drop_to(uid)) if uid is not None else None,
                capture_output=True,
                text=True,
                timeout=30,
            )
            wrapped.close()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"bwrap could not be started: {exc}"
    return None if result.returncode == 0 else (result.stderr.strip()[-300:] or "failed")


@functools.cache
def bwrap_mode(run_uid: int | None = DEFAULT_RUN_UID) -> tuple[str | None, str]:
    """(mode, why) for this host (cached): mode None means bwrap cannot run here."""
    if bwrap_path() is None:
        return None, "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    if os.geteuid() != 0:
        why = _probe(run_uid, "own")
        return ("own", "the runner's own uid") if why is None else (None, _userns_hint(why))
    if run_uid in (None, 0):
        why = _probe(run_uid, "map")
        return ("map", "run_uid 0: root in a user namespace") if why is None else (None, why)
    drop_why = _probe(run_uid, "drop")
    if drop_why is None:
        return "drop", f"uid {run_uid} outside and in"
    map_why = _probe(run_uid, "map")
    if map_why is None:
        return "map", (
            f"uid {run_uid} inside a user namespace, mapped to the runner's uid 0 outside "
            f"({drop_why}: make the interpreter's and the workspaces' parent folders "
            "world-searchable (o+x) to run as that uid outside too)"
        )
    return None, _userns_hint(f"{drop_why}; as root: {map_why}")


def _userns_hint(why: str) -> str:
    return (
        f"bwrap cannot create the run's namespaces ({why}); unprivileged user namespaces "
        "must be allowed (sysctl user.max_user_namespaces > 0, "
        "kernel.unprivileged_userns_clone=1 where it exists, "
        "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu; in a container, a seccomp "
        "profile that allows creating namespaces)"
    )


def bwrap_error(run_uid: int | None = DEFAULT_RUN_UID) -> str | None:
    """None when bwrap can start a run here; else why not (cached)."""
    mode, why = bwrap_mode(run_uid)
    return None if mode else why


@functools.cache
def _bwrap_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([bwrap_path() or "bwrap", "--version"], capture_output=True,
                             text=True, timeout=10).stdout  # fmt: skip
        return out.strip() or "bwrap"
    return "bwrap"


def host_protections(run_uid: int | None = DEFAULT_RUN_UID) -> dict[str, str]:
    """Exactly which protections a run gets on this host; each missing one reads "off: why".
    Cheap after the first call (the probes are cached); the runner logs it at start-up."""
    why = bwrap_error(run_uid)
    on = why is None
    mode, how = bwrap_mode(run_uid)
    if not on:
        user = f"{OFF}runs as the runner's user (uid {os.geteuid()})"
    elif mode == "map" and run_uid in (None, 0):
        user = f"{OFF}run_uid 0 asked for: root in a user namespace"
    else:
        user = how
    memory = memory_cgroup_error()
    cgroup2, _ = _cgroup_parents()
    return {
        "sandbox": _bwrap_version() if on else f"{OFF}{why}",
        "user": user,
        "capabilities": "none (all dropped), no_new_privs, no nested user namespaces"
        if on
        else f"{OFF}the runner's",
        "namespaces": "own pid, mount, network, ipc, uts, cgroup, user"
        if on
        else f"{OFF}network only, where unshare(CLONE_NEWNET) is allowed",
        "filesystem": "read-only system and interpreter; writable: workspace, run dir, cache; "
        "private /tmp; nothing else visible"
        if on
        else f"{OFF}the runner's whole filesystem, with the runner's rights",
        "resident_memory": "memory cgroup available for resident limits"
        if memory is None
        else f"{OFF}{memory}",
        "containment": "own cgroup per run" + (" and pid namespace" if on else "")
        if cgroup2 is not None
        else ("pid namespace (bwrap pid 1)" if on else f"{OFF}/proc scan only"),
    }


def isolation_gaps(protections: dict[str, str]) -> list[str]:
    """The protections not in force, as "name: why" lines (empty: full isolation)."""
    return [f"{name}: {value[len(OFF):]}" for name, value in protections.items()
            if value.startswith(OFF)]  # fmt: skip


def require_full_isolation(run_uid: int | None = DEFAULT_RUN_UID) -> dict[str, str]:
    """host_protections(), or IsolationUnavailable naming every gap and how to close it."""
    protections = host_protections(run_uid)
    if gaps := isolation_gaps(protections):
        raise IsolationUnavailable(
            "full isolation is required (require_full_isolation) but this host lacks: "
            + "; ".join(gaps)
            + ". Install bubblewrap, allow unprivileged user namespaces and delegate the "
            "memory cgroup controller, or set require_full_isolation=false to run with "
            "these gaps (recorded in every run's provenance)."
        )
    return protections
