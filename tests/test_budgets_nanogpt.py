"""nanogpt's training clock, owned by the protected budget_guard.py and checked by evaluate.py.

The guard wraps the whole (torchrun) command, measures wall seconds from launch outside
training, and kills and rejects a run still going at its deadline. Each way an idea might buy
more time is rejected or gains nothing: train past the clock with the harness timer reset and
time.monotonic patched (stopped at the guard's deadline, rejected); leave a daemon behind to
keep training and swap the checkpoint (killed when training exits, the scored model is the
guard's); swap the checkpoint after the ledger, or run without the guard (rejected).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from groundloop.execution.environment import Environment
from tests.budget_support import evaluate, patched, smoke_run
from tests.paths import REPO_ROOT

pytestmark = pytest.mark.slow

ENV = Environment.load("nanogpt", REPO_ROOT / "environments")
MAIN = "def main() -> None:\n"

# Resets the harness's timer, freezes time.monotonic for the harness, and never stops.
PAST_THE_CLOCK = """
    import time as _time
    harness._STARTED = _time.monotonic() + 10**6
    harness.time = type("FrozenTime", (), {"monotonic": staticmethod(lambda: 0.0)})
    harness.TrainingClock.should_stop = lambda self, step, model: step >= 10**9
"""

# Left behind by train.py: keeps "training" after train.py exits, then swaps the checkpoint.
DAEMON = """
    import subprocess, sys
    later = "import time; time.sleep(20); open('out/model.pt', 'wb').write(b'trained for longer')"
    subprocess.Popen([sys.executable, "-c", later], start_new_session=True)
"""


def test_training_past_the_clock_with_the_timer_reset_is_stopped_and_rejected(tmp_path):
    # Deadline: 4 s (the operator's override, read by the guard only) + 10 s to save.
    _, result, ledger = smoke_run(
        ENV, tmp_path, patched(ENV, MAIN, PAST_THE_CLOCK), {"NANOGPT_TRAIN_SECONDS": "4"}
    )
    assert "wall-clock deadline" in ledger["exceeded"]
    assert ledger["wall_budget"] == 14 and ledger["wall_seconds"] < 25
    assert result.outcome.status == "rejected"
    assert "exceeded its budget" in result.outcome.reason


def test_a_daemon_left_to_keep_training_is_killed_and_its_checkpoint_never_scored(tmp_path):
    workspace, result, ledger = smoke_run(ENV, tmp_path, patched(ENV, MAIN, DAEMON))
    assert result.outcome.status == "succeeded", result.outcome.reason
    assert ledger["exceeded"] is None and ledger["wall_seconds"] <= ledger["wall_budget"]
    assert (workspace / "out/model.pt").read_bytes() != b"trained for longer"
    assert result.outcome.metrics["train_seconds"] == ledger["wall_seconds"]  # guard's clock
    leftovers = subprocess.run(["pgrep", "-f", "trained for longer"], capture_output=True)
    assert leftovers.stdout == b"", "the guard left a process of the run alive"


def test_a_checkpoint_swapped_after_the_ledger_or_a_run_without_the_guard_is_rejected(tmp_path):
    workspace = ENV.materialize(tmp_path / "ws").path
    save = "import os; os.makedirs('out', exist_ok=True); open('out/model.pt', 'wb').write(b'a')"
    command = [sys.executable, "budget_guard.py", "--wall-seconds", "30", "--output"]
    subprocess.run(
        [*command, "out/model.pt", "--", "python", "-c", save], cwd=workspace, check=True
    )
    ledger = json.loads((workspace / "out/budget_ledger.json").read_text())
    assert ledger["exceeded"] is None and ledger["outputs"]["out/model.pt"]
    (workspace / "out/model.pt").write_bytes(b"trained for longer elsewhere")
    code, metrics = evaluate(workspace, tmp_path)
    assert code == 3 and "sha256 differs" in metrics["rejected"]
    (workspace / "out/budget_ledger.json").unlink()
    code, metrics = evaluate(workspace, tmp_path)
    assert code == 3 and "no budget ledger" in metrics["rejected"]


def test_the_environments_share_one_guard():
    """Each environment is a standalone folder copied into workspaces, so each carries the
    guard; the copies must stay one program."""
    guards = {
        e: (REPO_ROOT / "environments" / e / "budget_guard.py").read_bytes()
        for e in ("nanogpt", "grpo-math", "tinygpt", "tinygrpo")
    }
    assert len(set(guards.values())) == 1, "keep the budget_guard.py copies identical"
