"""Escape attempts through the whole run protocol (groundloop.execution.run_protocol.execute)
on a tiny environment made here: a patched train.py tries to tamper with the environment's
source folder (the code later runs are built from), and full isolation can be required.

Each test asserts the attempt failed and nothing outside changed: the environment's tree
digest, canaries, no process of the run left. Skipped, with the reason, without bwrap.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from groundloop.execution.bubblewrap import bwrap_error, isolation_gaps
from groundloop.execution.environment import Environment, ProtectedFileChanged, execute, tree_digest
from groundloop.execution.sandbox import (
    MARKER,
    IsolationUnavailable,
    Limits,
    host_protections,
    run_sandboxed,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(bwrap_error() is not None, reason=f"no bwrap sandbox: {bwrap_error()}"),
]

MANIFEST = """
name = "tiny"
description = "an environment for escape tests"
entrypoint = ["python", "train.py"]
evaluate = ["python", "evaluate.py"]
editable = ["train.py"]
protected = ["evaluate.py", "helper.py"]

[metric]
name = "score"
direction = "maximize"
reward = "x"

[budget]
wall_seconds = 20
grace_seconds = 0.5
eval_seconds = 20

[resources]
memory_gb = 1
"""
EVALUATE = """
import json, os
import helper
json.dump({"score": helper.SCORE}, open(os.environ["GROUNDLOOP_METRICS_OUT"], "w"))
"""


def make_env(tmp_path: Path, train: str) -> Environment:
    root = tmp_path / "envs" / "tiny"
    root.mkdir(parents=True)
    (root / "manifest.toml").write_text(MANIFEST)
    (root / "evaluate.py").write_text(EVALUATE)
    (root / "helper.py").write_text("SCORE = 0.5\n")
    (root / "train.py").write_text(textwrap.dedent(train))
    return Environment.load(root)


def run(env: Environment, tmp_path: Path, **kwargs):
    workspace = tmp_path / "runs" / "r1" / "ws"
    env.materialize(workspace)
    return execute(
        env,
        workspace,
        seed=0,
        run_dir=tmp_path / "runs" / "r1" / "run",
        cache_dir=tmp_path / "cache",
        **kwargs,
    )


def no_leftovers(tmp_path: Path) -> None:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                marked = MARKER.encode() in Path(f"/proc/{entry.name}/environ").read_bytes()
                cwd = os.readlink(f"/proc/{entry.name}/cwd")
            except OSError:
                continue
            assert not (marked and cwd.startswith(str(tmp_path))), f"pid {entry.name} survives"


@pytest.mark.parametrize(
    "attack",
    [
        # straight at the source folder, by its absolute path
        "open({root!r} + '/helper.py', 'w').write('SCORE = 99.0\\n')",
        # by walking up from the workspace (runs/r1/ws -> envs/tiny)
        "open('../../../envs/tiny/evaluate.py', 'a').write('\\nraise SystemExit\\n')",
        # replacing the source file by a rename, and planting a .pth next to it
        "import os; os.replace('helper.py', {root!r} + '/helper.py'); "
        "open({root!r} + '/sitecustomize.py', 'w').write('print(1)')",
    ],
)
def test_run_cannot_modify_the_environment_source(tmp_path: Path, attack: str):
    root = str(tmp_path / "envs" / "tiny")
    train = f"try:\n    {attack.format(root=root)}\n    print('ESCAPED')\nexcept OSError as e:\n"
    train += "    print('refused', e)\n"
    env = make_env(tmp_path, train)
    before = tree_digest(env.root)
    result = run(env, tmp_path)
    assert "ESCAPED" not in result.train.output_tail, result.train.output_tail
    assert tree_digest(env.root) == before
    env.verify_source()  # the reference copy is intact
    assert result.outcome.status == "succeeded" and result.outcome.score == 0.5, result.outcome
    assert result.isolation["sandbox"].startswith("bubblewrap")
    no_leftovers(tmp_path)


def test_tampered_workspace_copy_is_rejected_not_used(tmp_path: Path):
    env = make_env(tmp_path, "open('helper.py', 'w').write('SCORE = 99.0\\n')\n")
    before = tree_digest(env.root)
    result = run(env, tmp_path)
    assert result.outcome.status == "rejected", result.outcome
    assert tree_digest(env.root) == before
    no_leftovers(tmp_path)


def test_a_changed_source_stops_the_environment(tmp_path: Path):
    env = make_env(tmp_path, "pass\n")
    # What a run outside bwrap (or anything else on the host) could do: it is caught.
    (env.root / "helper.py").write_text("SCORE = 99.0\n")
    with pytest.raises(ProtectedFileChanged, match="changed since it was loaded"):
        run(env, tmp_path)


def test_runs_see_neither_the_source_nor_the_data_dir(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "store.db").write_text("canary")
    other = tmp_path / "runs" / "r0" / "ws"  # another run's workspace
    other.mkdir(parents=True)
    (other / "train.py").write_text("secret = 1\n")
    env = make_env(
        tmp_path,
        f"""
        import os
        for path in ({str(tmp_path / "envs")!r}, {str(data)!r}, {str(other.parent)!r}):
            if os.path.exists(path) and os.listdir(path):
                print("ESCAPED sees", path, os.listdir(path))
        print("own", os.listdir({str(tmp_path / "runs")!r}))
        """,
    )
    result = run(env, tmp_path)
    assert "ESCAPED" not in result.train.output_tail, result.train.output_tail
    assert (data / "store.db").read_text() == "canary"
    assert result.outcome.status == "succeeded", result.outcome
    assert result.isolation["resident_memory"].startswith(("resident <=", "off:"))


def test_require_full_isolation(tmp_path: Path):
    limits = Limits(require_full_isolation=True)
    gaps = isolation_gaps(host_protections())
    cmd = ["/bin/sh", "-c", "exit 0"]
    if gaps:  # this host falls short: the run must be refused, saying what is missing
        with pytest.raises(IsolationUnavailable, match="require_full_isolation"):
            run_sandboxed(cmd, cwd=tmp_path, env={}, wall_seconds=5, limits=limits)
        pytest.skip(f"host lacks full isolation (refusal checked): {gaps}")
    result = run_sandboxed(cmd, cwd=tmp_path, env={}, wall_seconds=5, limits=limits)
    assert result.returncode == 0 and result.isolation["sandbox"].startswith("bubblewrap")
    with pytest.raises(IsolationUnavailable, match="contradicts"):
        run_sandboxed(
            cmd,
            cwd=tmp_path,
            env={},
            wall_seconds=5,
            limits=Limits(require_full_isolation=True, isolate=False),
        )


DROP_CHECK = """
import sys; sys.path.insert(0, {src!r})
from pathlib import Path
from groundloop.execution.sandbox import Limits, allowed_environment, run_sandboxed
ws = Path({ws!r})
code = ("import os; s = open('/proc/self/status').read(); open('out', 'w').write('x'); "
        "print('uid', os.getuid(), os.getgroups(), 'cap', s.split('CapEff:')[1].split()[0])")
r = run_sandboxed([sys.executable, "-c", code], cwd=ws, env=allowed_environment({{}}, ws),
                  wall_seconds=20, limits=Limits(isolate=True))
print(r.output_tail, r.isolation["user"])
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root runner drops to a run uid")
def test_root_runner_drops_to_an_unprivileged_uid(tmp_path: Path):
    # The system interpreter, whose files the run uid can read: with this repo's venv under
    # /root (mode 700) the sandbox falls back to a user-namespace mapping instead.
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.skip("no /usr/bin/python3 to run a reachable interpreter")
    src = str(Path(__file__).resolve().parents[1] / "src")
    # pytest's tmp_path sits under a mode-700 folder; the run uid must reach its workspace.
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="groundloop-drop-") as scratch:
        Path(scratch).chmod(0o755)
        ws = Path(scratch) / "ws"
        ws.mkdir()
        out = subprocess.run(
            [str(python), "-c", DROP_CHECK.format(src=src, ws=str(ws))],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=scratch,
        )
        if "uid 65534 outside and in" not in out.stdout:
            pytest.skip(f"the run uid cannot reach the system interpreter: {out.stdout[-300:]}")
        assert "uid 65534 [] cap 0000000000000000" in out.stdout, out.stdout + out.stderr
        assert (ws / "out").stat().st_uid == 65534
