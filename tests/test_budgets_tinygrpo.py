"""tinygrpo's compute budget, enforced by the protected budget_guard.py and evaluate.py.

The budget is CPU seconds of everything training runs (train.py may choose its own number of
steps, so steps are not the limit). Ways to get more are each rejected or gain nothing: extra
threads and daemonised processes spend the same budget faster and the run is rejected; a
process left behind to keep training (or to swap the saved policy) is killed before the
ledger is written; a policy swapped after the ledger, or a run without one, is rejected.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment, execute
from tests.budget_support import evaluate, run_guard
from tests.paths import REPO_ROOT

pytestmark = pytest.mark.slow

ENV = Environment.load("tinygrpo", REPO_ROOT / "environments")


BURN = """
import os, subprocess, sys, threading, torch
burn = "while True: pass"
torch.set_num_threads(8)
subprocess.Popen([sys.executable, "-c", burn], start_new_session=True)
threading.Thread(target=lambda: exec(burn), daemon=True).start()
os.makedirs("out", exist_ok=True)
open("out/policy.pt", "wb").write(b"x")
exec(burn)
"""


def test_threads_and_daemons_spend_the_cpu_budget_and_are_rejected(tmp_path):
    made = ENV.materialize(tmp_path / "ws")
    ledger = run_guard(made.path, 1.5, "out/policy.pt", BURN)
    assert "CPU seconds" in ledger["exceeded"] and ledger["cpu_seconds"] >= 1.5
    assert subprocess.run(["pgrep", "-f", "while True: pass"], capture_output=True).stdout == b""
    code, metrics = evaluate(made.path, tmp_path)
    assert code == 3 and "exceeded its compute budget" in metrics["rejected"]


def test_a_policy_swapped_after_the_ledger_or_no_ledger_is_rejected(tmp_path):
    made = ENV.materialize(tmp_path / "ws")
    save = "import os; os.makedirs('out', exist_ok=True); open('out/policy.pt', 'wb').write(b'a')"
    ledger = run_guard(made.path, 30, "out/policy.pt", save)
    assert ledger["exceeded"] is None and ledger["outputs"]["out/policy.pt"]
    (made.path / "out" / "policy.pt").write_bytes(b"trained for longer elsewhere")
    code, metrics = evaluate(made.path, tmp_path)
    assert code == 3 and "sha256 differs" in metrics["rejected"]
    (made.path / "out" / "budget_ledger.json").unlink()
    code, metrics = evaluate(made.path, tmp_path)
    assert code == 3 and "no budget ledger" in metrics["rejected"]


# Left behind by train.py: keeps "training" after it exits, then swaps in its own policy.
# It waits well past the end of training (which takes seconds): the guard must kill it.
DAEMON = (
    "    import subprocess\n"
    '    later = ("import time, shutil; time.sleep(20); "\n'
    "             \"open('out/policy.pt', 'wb').write(b'trained for longer')\")\n"
    "    subprocess.Popen([sys.executable, '-c', later], start_new_session=True)\n"
)


def test_a_process_left_behind_to_keep_training_is_killed_and_gains_nothing(tmp_path):
    source = ENV.editable_sources()["train.py"]
    anchor = "def main() -> None:\n"
    assert source.count(anchor) == 1, "the baseline train.py changed; update this test"
    diff = make_diff({"train.py": source}, {"train.py": source.replace(anchor, anchor + DAEMON)})
    made = ENV.materialize(tmp_path / "ws", diff)
    result = execute(
        ENV, made.path, seed=0, run_dir=tmp_path / "run", cache_dir=tmp_path / "c", smoke=True
    )
    ledger = json.loads((made.path / "out" / "budget_ledger.json").read_text())
    assert result.outcome.status == "succeeded", result.outcome.reason
    assert (made.path / "out" / "policy.pt").read_bytes() != b"trained for longer"
    assert ledger["exceeded"] is None and 0 < ledger["cpu_seconds"] <= 60
