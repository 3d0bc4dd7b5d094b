"""nanogpt protected evaluation: validation loss of the saved model, a causality probe, metrics.

Runs as its own process after training (`python evaluate.py`, manifest `evaluate`):
- starts a model worker (model_worker.py) before it reads the split: the worker
  imports the workspace's train.py, rebuilds the model with `train.build_model(model_config)`
  from out/model.pt, and answers per-token losses for the batches this process sends it. It
  runs under a Landlock ruleset that denies reading the val/test shards
  (data.unreadable_paths()) and cannot read this process (made non-dumpable), so editable
  code never sees the evaluation split except the batch being scored; full logits never cross
  (too large): tokens go in, per-token fp32 losses come out. The model's forward runs before
  the worker is sent the batch's targets;
- scores the fixed token stream of GROUNDLOOP_SPLIT (`val` for search, `test` for final
  reports; data.eval_tokens) as rows of data.eval_seq_len() tokens, mean cross-entropy in fp32;
- runs the causality probe on real batches: every token after a random cut of the batch's
  token stream is replaced (the targets kept), and the losses at or before the cut must not
  move. That makes the one-pass loss equal to what token-by-token decoding would give (the
  paper's guardrail), and also catches leaks across rows of a batch (row i+1 continues row i
  in the stream). The cuts come from the OS's random source, so a model cannot know which
  positions are probed;
- writes GROUNDLOOP_METRICS_OUT: val_loss, causality_violation, train_seconds, tokens, steps,
  and in final mode (split `test`) target_reached and, when reached, seconds_to_target.

Before any editable code runs, the protected budget_guard.py's ledger (out/budget_ledger.json)
must show that the whole training run (torchrun and everything it started) exited within its
wall-clock budget, and must name out/model.pt's sha256; otherwise the run is rejected.
train_seconds (and, in final mode, seconds_to_target) are the guard's wall seconds from launch
to exit, never a number training wrote.

A leak, or a run outside its budget, exits with code 3 and writes only {"rejected": reason}:
the run is rejected with that reason. `loss_sums` also scores an in-process model, for
harness.py's final-mode checks during training.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import budget_guard
import data

CHECKPOINT = Path("out/model.pt")
EVAL_BATCH_SIZE = 16  # rows per forward pass (smoke: 8)
PROBED_BATCHES = 2  # the first batch and one chosen at random
# Same shapes and kernels give bit-identical prefixes; the slack only covers reduced precision.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
TARGET_SLACK = 1e-3  # in-training loss vs re-measured loss (different rank splits, same data)
LEAK_EXIT_CODE = 3


class Rejected(RuntimeError):
    """The run cannot be scored: outside its budget, or not the model the guard saw."""


def check_ledger() -> dict:
    """The protected guard's account of training, checked before any editable code runs."""
    ledger_path = budget_guard.LEDGER
    if ledger_path.is_symlink() or not ledger_path.is_file():
        raise Rejected(
            f"no budget ledger at {ledger_path}: training must be started by the protected "
            "budget_guard.py (the manifest's entrypoint), which owns the training clock"
        )
    ledger = json.loads(ledger_path.read_text())
    if ledger.get("exceeded"):
        raise Rejected(f"training exceeded its budget: {ledger['exceeded']}")
    budget = ledger.get("wall_budget")
    if not isinstance(budget, int | float) or not ledger.get("wall_seconds", math.inf) <= budget:
        raise Rejected("the budget ledger has no wall-clock budget or is over it")
    recorded = ledger.get("outputs", {}).get(str(CHECKPOINT))
    if not CHECKPOINT.is_file():
        raise FileNotFoundError(
            f"{CHECKPOINT} is missing: training must end with harness.save_checkpoint(...)"
        )
    if recorded != budget_guard.sha256(CHECKPOINT):
        raise Rejected(
            f"{CHECKPOINT} is not the model training left when the guard stopped its clock "
            "(sha256 differs from the guard's ledger)"
        )
    return ledger


class FutureTokenLeak(RuntimeError):
    """The model's outputs at some position depend on tokens after it."""


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def eval_batch_size() -> int:
    return 8 if data.smoke_mode() else EVAL_BATCH_SIZE


def batch_count(tokens: torch.Tensor, seq_len: int, batch_size: int) -> int:
    return (len(tokens) - 1) // (seq_len * batch_size)


def batch(
    tokens: torch.Tensor, index: int, seq_len: int, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of batch `index`: rows are consecutive pieces of the token stream."""
    span = seq_len * batch_size
    chunk = tokens[index * span : (index + 1) * span + 1].to(device)
    return chunk[:-1].view(batch_size, seq_len), chunk[1:].view(batch_size, seq_len)


def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for x, checked: (B, T, V >= data vocabulary), finite."""
    with autocast(x.device):
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(
            f"model(idx) must return logits of shape (B, T, vocab); got {shape} for "
            f"input {tuple(x.shape)} — keep that contract in train.py's forward"
        )
    if out.shape[-1] < data.vocab_size():
        raise TypeError(
            f"logits have {out.shape[-1]} entries, the data has {data.vocab_size()} token ids"
        )
    return out


@torch.no_grad()
def token_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, T) fp32 next-token cross-entropy of an in-process model."""
    logits = logits_of(model, x).float()
    flat = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
    return flat.view_as(y)


class LocalModel:
    """An in-process model (training's final-mode checks, tests): model code and the tokens
    share a process, which only the evaluation's worker avoids."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return token_losses(self.model, x, y)


def scorer(model):
    """A module scored in this process, or a model_worker.RemoteModel as it is."""
    return LocalModel(model) if isinstance(model, torch.nn.Module) else model


@torch.no_grad()
def loss_sums(
    model,
    tokens: torch.Tensor,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> tuple[float, int]:
    """Summed next-token cross-entropy (fp32) and token count over this rank's batches;
    `model` is a module (in-process) or a RemoteModel."""
    scoring = scorer(model)
    total, count = 0.0, 0
    for index in range(rank, batch_count(tokens, seq_len, batch_size), world):
        x, y = batch(tokens, index, seq_len, batch_size, device)
        total += scoring.losses(x, y).sum().item()
        count += y.numel()
    return total, count


@torch.no_grad()
def causality_violation(
    model, x: torch.Tensor, y: torch.Tensor, cut: int, rng: random.Random
) -> float:
    """How far the per-token losses at stream positions <= cut move when every later input
    token changes (targets kept), relative to their scale. 0 for a causal model."""
    scoring = scorer(model)
    original = scoring.losses(x, y).float().flatten()
    stream = x.flatten().clone()
    later = len(stream) - cut - 1
    if later <= 0:
        return 0.0
    replacement = torch.tensor(
        [rng.randrange(data.vocab_size()) for _ in range(later)],
        dtype=stream.dtype,
        device=stream.device,
    )
    # Replace with different tokens everywhere (a random draw can coincide with the original).
    same = replacement == stream[cut + 1 :]
    replacement[same] = (replacement[same] + 1) % data.vocab_size()
    stream[cut + 1 :] = replacement
    perturbed = scoring.losses(stream.view_as(x), y).float().flatten()
    moved = (original[: cut + 1] - perturbed[: cut + 1]).abs().max().item()
    scale = 1.0 + original[: cut + 1].abs().max().item()
    return moved / scale if math.isfinite(moved) else math.inf


def probe(
    model, tokens: torch.Tensor, seq_len: int, batch_size: int, device: torch.device
) -> float:
    """Largest causality violation over the probed batches; raises FutureTokenLeak."""
    rng = random.SystemRandom()  # unpredictable to the model under test
    batches = batch_count(tokens, seq_len, batch_size)
    chosen = sorted({0, rng.randrange(batches)})[:PROBED_BATCHES]
    span = seq_len * batch_size
    worst = 0.0
    for index in chosen:
        x, y = batch(tokens, index, seq_len, batch_size, device)
        # One cut inside the first row (in-row and cross-row future), one anywhere.
        for cut in (rng.randrange(seq_len - 1), rng.randrange(span - 1)):
            worst = max(worst, causality_violation(model, x, y, cut, rng))
    tolerance = PROBE_TOLERANCE[compute_dtype(getattr(model, "device", device))]
    if not worst <= tolerance:
        raise FutureTokenLeak(
            f"future-token leak: losses at positions <= t changed by {worst:.3g} (relative; "
            f"tolerance {tolerance:g}) when only tokens after t changed. The model must be "
            "causal: no position may see a later token, in its row or in a later row"
        )
    return worst


def load_meta() -> dict:
    """The checkpoint's training metadata, read without running any of its code."""
    if not CHECKPOINT.is_file():
        raise FileNotFoundError(
            f"{CHECKPOINT} is missing: training must end with harness.save_checkpoint(...)"
        )
    checkpoint = torch.load(CHECKPOINT, map_location="cpu", weights_only=True, mmap=True)
    return dict(checkpoint.get("meta", {}))


def main(standalone: bool = False) -> int:
    """Score out/model.pt. `standalone` (run as a script): this process is made non-dumpable,
    so the worker cannot read the split from its memory, and a subreaper whose every
    descendant dies before the metrics are written."""
    device_name = os.environ.get("GROUNDLOOP_DEVICE", "cpu")
    split = os.environ.get("GROUNDLOOP_SPLIT", "val")
    metrics_out = os.environ.get("GROUNDLOOP_METRICS_OUT")
    if standalone:
        budget_guard._libc.prctl(budget_guard.PR_SET_DUMPABLE, 0, 0, 0, 0)
        budget_guard._libc.prctl(budget_guard.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    here = torch.device("cpu")  # this process never runs the model
    model = None
    try:
        ledger = check_ledger()
        meta = load_meta()
        from model_worker import RemoteModel  # protected; imports this module for logits_of

        model = RemoteModel(device_name)  # started before the split is read
        print(f"evaluate: model worker started, shard Landlock {model.landlock}", flush=True)
        tokens = data.eval_tokens(split)
        seq_len, batch_size = data.eval_seq_len(), eval_batch_size()
        violation = probe(model, tokens, seq_len, batch_size, here)
        total, count = loss_sums(model, tokens, seq_len, batch_size, here)
        model.close()
    except (FutureTokenLeak, Rejected) as leak:
        print(f"REJECTED: {leak}", file=sys.stderr, flush=True)
        if metrics_out:  # the runner marks the run rejected with this reason
            Path(metrics_out).write_text(json.dumps({"rejected": str(leak)}))
        return LEAK_EXIT_CODE
    finally:
        if model is not None and model.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(model.process.pid, signal.SIGKILL)
            model.process.wait(timeout=30)
        if standalone:
            budget_guard.Guard(0).kill_tree()
    val_loss = total / count
    metrics = {"val_loss": val_loss, "causality_violation": violation, "eval_tokens": count}
    metrics["train_seconds"] = float(ledger["wall_seconds"])  # the guard's clock
    for name, key in (
        ("tokens", "tokens"),
        ("steps", "step"),
        ("world_size", "world_size"),
    ):
        if isinstance(meta.get(key), int | float):
            metrics[name] = float(meta[key])
    if split == "test":
        target = float(meta.get("target_loss", math.nan))
        reached_at = meta.get("seconds_to_target")
        reached = (
            reached_at is not None
            and meta.get("split") == split
            and val_loss <= target + TARGET_SLACK
        )
        metrics["target_loss"] = target
        metrics["target_reached"] = 1.0 if reached else 0.0
        if reached:
            # Launch to exit, as the guard measured it: training's own claim is not evidence.
            metrics["seconds_to_target"] = metrics["train_seconds"]
    print(json.dumps(metrics), flush=True)
    if metrics_out:
        Path(metrics_out).write_text(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main(standalone=True))
