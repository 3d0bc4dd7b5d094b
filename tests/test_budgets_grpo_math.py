"""grpo-math's training clock, owned by the protected budget_guard.py and checked by evaluate.py.

The guard starts train.py, measures wall seconds from launch outside training, kills and
rejects a run still going at its deadline, and hashes out/checkpoints once every process of
training is dead. Each way an idea might buy more compute is rejected or gains nothing: run
extra GRPO steps with the harness clock patched to never run out (stopped at the guard's
deadline, rejected); leave a daemon behind to keep training and swap a checkpoint (killed when
training exits, never scored); swap a checkpoint after the ledger, or run without the guard
(rejected). The evaluation never imports train.py and loads weights from safetensors only.
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

ENV = Environment.load("grpo-math", REPO_ROOT / "environments")
MAIN = "def main() -> None:\n"

# Extra steps: a step budget far beyond the clock, and a harness clock that never runs out.
EXTRA_STEPS = """
    SMOKE["GRPO_STEPS"] = 10**6
    SMOKE["CHECKPOINT_EVERY"] = 10**6
    harness.TrainingClock.seconds_left = lambda self: 10.0**9
    harness.TrainingClock.training_seconds = lambda self: 0.0
"""

# Left behind by train.py: keeps "training" after train.py exits, then swaps a checkpoint.
DAEMON = """
    import subprocess, sys
    later = (
        "import time, pathlib; time.sleep(20); "
        "[p.write_bytes(b'trained for longer') "
        "for p in pathlib.Path('out/checkpoints').rglob('*.safetensors')]"
    )
    subprocess.Popen([sys.executable, "-c", later], start_new_session=True)
"""


def test_extra_steps_past_the_clock_are_stopped_and_rejected(tmp_path):
    # Deadline: 4 s (the operator's override, read by the guard only) + 10 s to save.
    _, result, ledger = smoke_run(
        ENV, tmp_path, patched(ENV, MAIN, EXTRA_STEPS), {"GRPO_MATH_TRAIN_SECONDS": "4"}
    )
    assert "wall-clock deadline" in ledger["exceeded"]
    assert ledger["wall_budget"] == 14 and ledger["wall_seconds"] < 25
    assert result.outcome.status == "rejected"
    assert "exceeded its budget" in result.outcome.reason


def test_a_daemon_left_to_keep_training_is_killed_and_its_checkpoint_never_scored(tmp_path):
    workspace, result, ledger = smoke_run(ENV, tmp_path, patched(ENV, MAIN, DAEMON))
    assert result.outcome.status == "succeeded", result.outcome.reason
    assert ledger["exceeded"] is None and ledger["outputs"]["out/checkpoints"]
    weights = list((workspace / "out/checkpoints").rglob("*.safetensors"))
    assert weights and all(w.read_bytes() != b"trained for longer" for w in weights)
    leftovers = subprocess.run(["pgrep", "-f", "trained for longer"], capture_output=True)
    assert leftovers.stdout == b"", "the guard left a process of the run alive"


def test_a_checkpoint_swapped_after_the_ledger_or_a_run_without_the_guard_is_rejected(tmp_path):
    workspace = ENV.materialize(tmp_path / "ws").path
    save = (
        "import pathlib; step = pathlib.Path('out/checkpoints/step_000001'); "
        "step.mkdir(parents=True); (step / 'model.safetensors').write_bytes(b'a')"
    )
    command = [sys.executable, "budget_guard.py", "--wall-seconds", "30", "--output"]
    subprocess.run(
        [*command, "out/checkpoints", "--", "python", "-c", save], cwd=workspace, check=True
    )
    ledger = json.loads((workspace / "out/budget_ledger.json").read_text())
    assert ledger["exceeded"] is None and ledger["outputs"]["out/checkpoints"]
    later = workspace / "out/checkpoints/step_000009"  # one more checkpoint, trained elsewhere
    later.mkdir()
    (later / "model.safetensors").write_bytes(b"b")
    code, metrics = evaluate(workspace, tmp_path)
    assert code == 3 and "sha256 differs" in metrics["rejected"]
    (workspace / "out/budget_ledger.json").unlink()
    code, metrics = evaluate(workspace, tmp_path)
    assert code == 3 and "no budget ledger" in metrics["rejected"]
