"""Shared by tests/test_budgets_*.py: run the protected budget guard and evaluation of an
environment the way its manifest does, on a patched train.py, and read what they recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment, execute


def patched(env: Environment, anchor: str, code: str) -> str:
    """A diff of train.py with `code` inserted right after the line `anchor`."""
    source = env.editable_sources()["train.py"]
    assert source.count(anchor) == 1, "the baseline train.py changed; update this test"
    return make_diff({"train.py": source}, {"train.py": source.replace(anchor, anchor + code)})


def smoke_run(env: Environment, tmp: Path, diff: str, extra_env: dict[str, str] | None = None):
    """(workspace, the run's Execution, the guard's ledger) of a smoke run of `diff`."""
    made = env.materialize(tmp / "ws", diff)
    result = execute(
        env,
        made.path,
        seed=0,
        run_dir=tmp / "run",
        cache_dir=tmp / "cache",
        smoke=True,
        extra_env=extra_env,
    )
    return made.path, result, json.loads((made.path / "out/budget_ledger.json").read_text())


def run_guard(workspace: Path, cpu_seconds: float, output: str, code: str) -> dict:
    """The guard alone around `python -c code`, with a CPU-seconds cap; its ledger."""
    command = [sys.executable, "budget_guard.py", "--cpu-seconds", str(cpu_seconds)]
    command += ["--output", output, "--", "python", "-c", code]
    subprocess.run(command, cwd=workspace, check=True, timeout=60)
    return json.loads((workspace / "out" / "budget_ledger.json").read_text())


def evaluate(workspace: Path, tmp: Path) -> tuple[int, dict]:
    """The protected evaluation in smoke mode: (exit code, what it wrote)."""
    metrics = tmp / "metrics.json"
    done = subprocess.run(
        [sys.executable, "evaluate.py"],
        cwd=workspace,
        env={**os.environ, "GROUNDLOOP_METRICS_OUT": str(metrics), "GROUNDLOOP_SMOKE": "1"},
        timeout=60,
    )
    return done.returncode, json.loads(metrics.read_text())
