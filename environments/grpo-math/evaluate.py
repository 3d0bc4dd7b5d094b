"""grpo-math protected evaluation: accuracy of the saved policies on MATH, metrics out.

Runs as its own process after training (`python evaluate.py`, manifest `evaluate`); it never
imports train.py. For every checkpoint under out/checkpoints (harness.save_checkpoint, at most
harness.MAX_CHECKPOINTS) it generates one greedy answer per validation problem with the
protected r1_zero prompt (data.format_prompt), stops at "</answer>", and grades it with the
protected grader (grader.grade). Generation uses vLLM in a child process when vLLM is installed
and a GPU is used (GRPO_MATH_ENGINE=hf forces Hugging Face generate), HF generate otherwise.
Weights come from the checkpoint; the tokenizer and generation settings never do.

GROUNDLOOP_SPLIT=val (search): accuracy = the best checkpoint's validation accuracy.
GROUNDLOOP_SPLIT=test (final report): the checkpoint is chosen on validation, and accuracy is
its MATH-500 accuracy; selection never looks at the test split.
Writes GROUNDLOOP_METRICS_OUT: accuracy, val_accuracy, final_val_accuracy, best_step,
format_rate, checkpoints, problems.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import budget_guard
import data
import grader
import harness

MAX_NEW_TOKENS = 1024
SMOKE_MAX_NEW_TOKENS = 16
HF_BATCH_SIZE = 64
STOP = "</answer>"


def engine(device: torch.device) -> str:
    forced = os.environ.get("GRPO_MATH_ENGINE")
    if forced in ("hf", "vllm"):
        return forced
    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if has_vllm and device.type == "cuda" and not data.smoke_mode() else "hf"


def max_new_tokens() -> int:
    return SMOKE_MAX_NEW_TOKENS if data.smoke_mode() else MAX_NEW_TOKENS


def cut_at_stop(text: str) -> str:
    end = text.find(STOP)
    return text if end < 0 else text[: end + len(STOP)]


class StopOnText:
    """Stopping criterion: a row is done once its generated text contains STOP."""

    def __init__(self, tokenizer, prompt_width: int) -> None:
        self.tokenizer, self.prompt_width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tails = input_ids[:, max(self.prompt_width, input_ids.shape[1] - 12) :]
        done = [STOP in self.tokenizer.decode(row, skip_special_tokens=True) for row in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def left_padded(tokenizer, prompts: list[str], device: torch.device):
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(len(seq) for seq in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention[row, width - len(seq) :] = 1
    return input_ids.to(device), attention.to(device), width


@torch.no_grad()
def generate_hf(checkpoint: Path, prompts: list[str], device: torch.device) -> list[str]:
    from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteriaList

    data.quiet_transformers()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # safetensors only: a pickled checkpoint could run code here; no remote code either.
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, use_safetensors=True)
    model = model.to(device).eval()
    tokenizer = data.load_tokenizer()
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens(),
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = []
    for start in range(0, len(prompts), HF_BATCH_SIZE):
        input_ids, attention, width = left_padded(
            tokenizer, prompts[start : start + HF_BATCH_SIZE], device
        )
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            generation_config=settings,
            stopping_criteria=StoppingCriteriaList([StopOnText(tokenizer, width)]),
        )
        texts += [
            cut_at_stop(tokenizer.decode(row, skip_special_tokens=True))
            for row in output[:, width:]
        ]
    del model
    return texts


def generate_vllm(checkpoint: Path, prompts: list[str]) -> list[str]:
    """Generate in a child process, so each checkpoint gets a clean GPU."""
    with tempfile.TemporaryDirectory(prefix="grpo-eval-") as scratch:
        prompts_path, out_path = Path(scratch) / "prompts.json", Path(scratch) / "out.json"
        prompts_path.write_text(json.dumps(prompts))
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--vllm-generate",
                str(checkpoint),
                str(prompts_path),
                str(out_path),
            ],
            check=True,
        )
        return json.loads(out_path.read_text())


def _vllm_child(checkpoint: str, prompts_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=checkpoint,
        tokenizer=str(data.model_dir()),
        dtype="bfloat16",
        seed=0,
        gpu_memory_utilization=0.85,
        load_format="safetensors",
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=max_new_tokens(), stop=[STOP], include_stop_str_in_output=True
    )
    outputs = llm.generate(json.loads(Path(prompts_path).read_text()), params)
    Path(out_path).write_text(json.dumps([cut_at_stop(o.outputs[0].text) for o in outputs]))


def score(checkpoint: Path, problems: list[dict], device: torch.device) -> dict[str, float]:
    prompts = [data.format_prompt(p["problem"]) for p in problems]
    if engine(device) == "vllm":
        responses = generate_vllm(checkpoint, prompts)
    else:
        responses = generate_hf(checkpoint, prompts, device)
    correct = [grader.grade(r, p["answer"]) for r, p in zip(responses, problems, strict=True)]
    formatted = [grader.has_format(r) for r in responses]
    for response, problem in list(zip(responses, problems, strict=True))[:2]:
        print(f"--- sample ({problem['answer']!r}): {response[-300:]!r}", flush=True)
    return {"accuracy": sum(correct) / len(problems), "format_rate": sum(formatted) / len(problems)}


def check_ledger() -> str | None:
    """The rejection reason, or None when the protected guard's ledger shows training exited
    within its wall-clock budget and names exactly the checkpoints on disk now."""
    ledger_path, folder = budget_guard.LEDGER, harness.CHECKPOINT_DIR
    if ledger_path.is_symlink() or not ledger_path.is_file():
        return (
            f"no budget ledger at {ledger_path}: training must be started by the protected "
            "budget_guard.py (the manifest's entrypoint), which owns the training clock"
        )
    ledger = json.loads(ledger_path.read_text())
    if ledger.get("exceeded"):
        return f"training exceeded its budget: {ledger['exceeded']}"
    budget = ledger.get("wall_budget")
    if (
        not isinstance(budget, int | float)
        or not ledger.get("wall_seconds", float("inf")) <= budget
    ):
        return "the budget ledger has no wall-clock budget or is over it"
    if ledger.get("outputs", {}).get(str(folder)) != budget_guard.sha256(folder):
        return (
            f"{folder} is not what training left when the guard stopped its clock "
            "(sha256 differs from the guard's ledger)"
        )
    return None


def main() -> int:
    device = torch.device("cuda:0" if os.environ.get("GROUNDLOOP_DEVICE") == "cuda" else "cpu")
    split = os.environ.get("GROUNDLOOP_SPLIT", "val")
    if split not in ("val", "test"):
        raise SystemExit(f"GROUNDLOOP_SPLIT={split!r}: use val (search) or test (final report)")
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    if rejected := check_ledger():
        print(f"REJECTED: {rejected}", file=sys.stderr, flush=True)
        if os.environ.get("GROUNDLOOP_METRICS_OUT"):
            Path(os.environ["GROUNDLOOP_METRICS_OUT"]).write_text(
                json.dumps({"rejected": rejected})
            )
        return 3
    checkpoints = harness.checkpoint_dirs()[: harness.MAX_CHECKPOINTS]
    if not checkpoints:
        raise SystemExit(
            f"no checkpoints in {harness.CHECKPOINT_DIR}: training must save the "
            "policy with harness.save_checkpoint(...)"
        )
    val_problems = data.load_problems("val")
    results = {}
    for checkpoint in checkpoints:
        results[checkpoint] = score(checkpoint, val_problems, device)
        print(f"{checkpoint.name}: val accuracy {results[checkpoint]['accuracy']:.4f}", flush=True)
    best = max(checkpoints, key=lambda c: results[c]["accuracy"])  # earliest among ties
    metrics = {
        "val_accuracy": results[best]["accuracy"],
        "final_val_accuracy": results[checkpoints[-1]]["accuracy"],
        "best_step": float(harness.read_meta(best)["step"]),
        "format_rate": results[best]["format_rate"],
        "checkpoints": float(len(checkpoints)),
        "problems": float(len(val_problems)),
    }
    if split == "test":
        test_problems = data.load_problems("test")
        test = score(best, test_problems, device)
        metrics.update(
            accuracy=test["accuracy"],
            format_rate=test["format_rate"],
            problems=float(len(test_problems)),
        )
    else:
        metrics["accuracy"] = metrics["val_accuracy"]
    print(json.dumps(metrics), flush=True)
    if os.environ.get("GROUNDLOOP_METRICS_OUT"):
        Path(os.environ["GROUNDLOOP_METRICS_OUT"]).write_text(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="grpo-math protected evaluation")
    parser.add_argument(
        "--vllm-generate",
        nargs=3,
        metavar=("CHECKPOINT", "PROMPTS", "OUT"),
        help="internal: generate with vLLM in this (child) process",
    )
    arguments = parser.parse_args()
    if arguments.vllm_generate:
        _vllm_child(*arguments.vllm_generate)
        sys.exit(0)
    sys.exit(main())
