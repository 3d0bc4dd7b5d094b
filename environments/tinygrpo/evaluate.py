"""tinygrpo evaluation (protected): greedy-decoding accuracy of the trained policy.

Consumes: out/policy.pt written by train.py ({"model": state_dict, "config": PolicyConfig
fields}), loaded into the protected policy.Policy; the fixed problems of
task.eval_problems(GROUNDLOOP_SPLIT) ("val" for search, "test" for final reports only).
Emits: the JSON object at GROUNDLOOP_METRICS_OUT:
  {"accuracy": fraction exactly right, "<split>_accuracy": same, "correct": n, "problems": n,
   "answer_logprob": mean log-probability of the right answer (a finer-grained signal),
   "provenance": {"split": ..., "base_policy": ...}}

Decoding is greedy and done here, with the protected model class, so nothing in train.py runs.

Run: python evaluate.py (in the workspace, after train.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import budget_guard
import policy
import task
import torch

CHECKPOINT = Path("out/policy.pt")
EXIT_REJECTED = 3


def budget_violation() -> str | None:
    """Why the protected guard's ledger (budget_guard.py) says the run may not be scored."""
    ledger_path = budget_guard.LEDGER
    if ledger_path.is_symlink() or not ledger_path.is_file():
        return (
            f"no budget ledger at {ledger_path}: training must be started by the protected "
            "budget_guard.py (the manifest's entrypoint), which counts its compute"
        )
    ledger = json.loads(ledger_path.read_text())
    if ledger.get("exceeded"):
        return f"training exceeded its compute budget: {ledger['exceeded']}"
    actual = hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest() if CHECKPOINT.is_file() else None
    if actual is not None and ledger.get("outputs", {}).get(str(CHECKPOINT)) != actual:
        return (
            f"{CHECKPOINT} is not the policy training left when its budget was counted "
            "(sha256 differs from the guard's ledger)"
        )
    return None


def write_metrics(payload: dict) -> None:
    target = os.environ.get("GROUNDLOOP_METRICS_OUT")
    if not target:
        print(json.dumps(payload, indent=2))
        print("GROUNDLOOP_METRICS_OUT is not set; printed the metrics instead", file=sys.stderr)
        return
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(json.dumps(payload, indent=2, sort_keys=True))


@torch.no_grad()
def answer_logprob(model: policy.Policy, problems: list[task.Problem]) -> float:
    """Mean over problems of log p(right answer | prompt), teacher-forced."""
    width = task.PROMPT_LEN + task.MAX_ANSWER_TOKENS
    rows = [task.encode(task.prompt_text(p) + task.answer_text(p)) for p in problems]
    ids = torch.tensor([row + [task.PAD_ID] * (width - len(row)) for row in rows])
    logprobs = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[:, task.PROMPT_LEN - 1 :]
    answers = ids[:, task.PROMPT_LEN :]
    scored = logprobs.gather(-1, answers[..., None]).squeeze(-1) * (answers != task.PAD_ID)
    return scored.sum().item() / len(problems)


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    split = os.environ.get("GROUNDLOOP_SPLIT", "val")
    smoke = os.environ.get("GROUNDLOOP_SMOKE") == "1"
    started = time.perf_counter()
    if reason := budget_violation():
        print(f"evaluate: REJECTED: {reason}", file=sys.stderr)
        write_metrics({"rejected": reason, "provenance": {"split": split}})
        raise SystemExit(EXIT_REJECTED)
    try:
        model = policy.load_policy(CHECKPOINT).eval()
        problems = task.eval_problems(split, smoke=smoke)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise SystemExit(f"evaluate: {exc}") from None
    completions = policy.greedy_decode(model, task.encode_prompts(problems))
    correct = int(sum(task.reward(p, c) for p, c in zip(problems, completions, strict=True)))
    accuracy = correct / len(problems)
    metrics = {
        "accuracy": accuracy,
        f"{split}_accuracy": accuracy,
        "correct": correct,
        "problems": len(problems),
        "answer_logprob": answer_logprob(model, problems),
        "provenance": {"split": split, "base_policy": policy.base_checkpoint_path().name},
    }
    write_metrics(metrics)
    examples = ", ".join(
        f"{task.prompt_text(p)}{task.completion_text(c)}"
        for p, c in zip(problems[:3], completions[:3], strict=True)
    )
    print(
        f"evaluate: {split} accuracy {accuracy:.3f} ({correct}/{len(problems)}) in "
        f"{time.perf_counter() - started:.1f}s, "
        f"answer logprob {metrics['answer_logprob']:.3f}; e.g. {examples}",
        flush=True,
    )


if __name__ == "__main__":
    main()
