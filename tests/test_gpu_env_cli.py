"""`groundloop search --env nanogpt|grpo-math` on a machine without GPUs says so and how to
run remote GPU runners, before starting anything; GPU counts come from the manifest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("env", "per_run"), [("nanogpt", 8), ("grpo-math", 1)])
def test_no_gpu_exits_non_zero_with_the_remote_runner_command(env, per_run, tmp_path) -> None:
    path = ":".join(
        p for p in os.environ["PATH"].split(":") if not (Path(p) / "nvidia-smi").exists()
    )
    result = subprocess.run(
        [sys.executable, "-m", "groundloop.cli", "search", "--env", env],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PATH": path, "GROUNDLOOP_DATA_DIR": str(tmp_path), "COLUMNS": "300"},
        timeout=120,
    )
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, out
    assert f"need {per_run} GPU(s) each" in out and "no GPU" in out
    assert "--no-runner" in out and f"--gpus-per-run {per_run}" in out
    assert "python -m groundloop.runner --resource-class" in out


def test_visible_gpus_are_read_from_nvidia_smi(tmp_path, monkeypatch) -> None:
    from groundloop.cli.gpus import plan_gpus
    from groundloop.execution.environment import Environment

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: H200 (UUID: a)'\necho 'GPU 1: H200 (UUID: b)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    plan = plan_gpus(Environment.load("grpo-math", ROOT / "environments"), with_runner=True)
    assert plan is not None and plan.gpus == ["0", "1"] and plan.per_run == 1 and plan.slots == 2
