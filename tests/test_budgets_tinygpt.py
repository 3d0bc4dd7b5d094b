"""tinygpt's token and compute budget, enforced by the protected budget_guard.py and data.py.

One adversarial train.py (real smoke runs through the run protocol) tries several ways to get
more than its budget, each checked by its own test: reset and monkeypatch the data module and
loop over the data twice (the guard serves no extra token), read the corpus itself (denied by
Landlock), forge the budget ledger from a process that outlives training (killed, then
overwritten), and read the evaluation split from model code when evaluate.py imports train.py
(denied in the model worker). Spending more CPU than the budget (threads, daemonised
processes) is stopped by the guard and rejected by the evaluation.
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

ENV = Environment.load("tinygpt", REPO_ROOT / "environments")
SMOKE_TOKENS = 32_768

ATTACKS = """
def attacks() -> None:
    import subprocess, sysconfig
    first = sum(1 for _ in data.train_batches(BATCH_SIZE, BLOCK_SIZE, 0))
    data._tokens_served = 0  # reset the counter
    data.token_budget = lambda smoke=False: 10**9  # and raise the budget
    data.TOKEN_BUDGET = data.SMOKE_TOKENS = 10**9
    second = sum(1 for _ in data.train_batches(BATCH_SIZE, BLOCK_SIZE, 1))
    print(f"ATTACK loop first={first} second={second}", flush=True)
    for name, read in {
        "stdlib": lambda: open(sysconfig.get_paths()["stdlib"] + "/argparse.py").read(),
        "load_split": lambda: data.load_split("train"),
    }.items():
        try:
            read()
            print(f"ATTACK read {name}=ok", flush=True)
        except OSError as exc:
            print(f"ATTACK read {name}=denied {type(exc).__name__}", flush=True)
    forged = '{"exceeded": null, "outputs": {}, "cpu_seconds": 0, "served": {}}'
    Path("out").mkdir(exist_ok=True)
    Path("out/budget_ledger.json").write_text(forged)
    daemon = f"import time, pathlib; time.sleep(3); pathlib.Path({str(Path.cwd() / 'out/budget_ledger.json')!r}).write_text({forged!r})"
    subprocess.Popen([sys.executable, "-c", daemon], start_new_session=True)


if "evaluate" in sys.argv[0]:  # imported by the evaluation's model worker
    try:
        data.eval_tokens("val")
        print("ATTACK eval split=ok", flush=True)
    except OSError as exc:
        print(f"ATTACK eval split=denied {type(exc).__name__}", flush=True)

"""


def adversarial_diff() -> str:
    source = ENV.editable_sources()["train.py"]
    anchor = (
        "# ----------------------------------------------------------------------------- loop\n"
    )
    patched = source.replace(anchor, anchor + ATTACKS).replace(
        "    model.train()\n", "    attacks()\n    model.train()\n"
    )
    assert patched.count("attacks()") == 2, "the baseline train.py changed; update ATTACKS"
    return make_diff({"train.py": source}, {"train.py": patched})


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacked")
    made = ENV.materialize(tmp / "ws", adversarial_diff())
    result = execute(
        ENV, made.path, seed=0, run_dir=tmp / "run", cache_dir=tmp / "cache", smoke=True
    )
    logs = (tmp / "run" / "train.log").read_text(), (tmp / "run" / "evaluate.log").read_text()
    ledger = json.loads((made.path / "out" / "budget_ledger.json").read_text())
    return result, logs, ledger


def test_resetting_patching_or_reopening_the_data_serves_no_extra_token(attacked):
    result, (train_log, _), ledger = attacked
    assert "ATTACK loop first=16 second=0" in train_log
    assert ledger["served"]["tokens"] == SMOKE_TOKENS and ledger["exceeded"] is None
    assert result.outcome.status == "succeeded"  # it trained on exactly its budget


def test_training_cannot_read_the_corpus_itself(attacked):
    _, (train_log, _), ledger = attacked
    assert ledger["landlock"] == "enforced", "this kernel has no Landlock; the test needs it"
    assert "ATTACK read stdlib=denied PermissionError" in train_log
    assert "ATTACK read load_split=denied PermissionError" in train_log


def test_a_forged_ledger_is_overwritten_and_its_writer_killed(attacked):
    result, _, ledger = attacked
    assert ledger["served"]["tokens"] == SMOKE_TOKENS and ledger["cpu_seconds"] > 0
    assert ledger["outputs"]["out/ckpt.pt"]  # the guard's own record, with the checkpoint
    assert result.outcome.status == "succeeded" and ledger["exceeded"] is None


def test_model_code_imported_by_the_evaluation_cannot_read_the_eval_split(attacked):
    _, (_, evaluate_log), _ = attacked
    assert "ATTACK eval split=denied PermissionError" in evaluate_log


# Busy-loops in this process, a thread and a daemonised grandchild: the spend of all counts.
BURN = """
import os, subprocess, sys, threading, time
burn = "while True: pass"
subprocess.Popen([sys.executable, "-c", burn], start_new_session=True)
threading.Thread(target=lambda: exec(burn), daemon=True).start()
os.makedirs("out", exist_ok=True)
open("out/ckpt.pt", "wb").write(b"x")
exec(burn)
"""


def test_extra_threads_and_processes_spend_the_cpu_budget_and_are_rejected(tmp_path):
    made = ENV.materialize(tmp_path / "ws")
    ledger = run_guard(made.path, 1.5, "out/ckpt.pt", BURN)
    assert ledger["exceeded"] and "CPU seconds" in ledger["exceeded"]
    assert ledger["cpu_seconds"] >= 1.5
    leftovers = subprocess.run(["pgrep", "-f", "while True: pass"], capture_output=True)
    assert leftovers.stdout == b"", "the guard left a process of the run alive"
    code, metrics = evaluate(made.path, tmp_path)
    assert code == 3
    assert "exceeded its compute budget" in metrics["rejected"]


def test_an_evaluation_without_the_guards_ledger_is_rejected(tmp_path):
    made = ENV.materialize(tmp_path / "ws")
    (made.path / "out").mkdir()
    (made.path / "out" / "ckpt.pt").write_bytes(b"not from a guarded run")
    code, metrics = evaluate(made.path, tmp_path)
    assert code == 3
    assert "no budget ledger" in metrics["rejected"]
