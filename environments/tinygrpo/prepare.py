"""tinygrpo prepare (protected): build the base policy by a short supervised warm-up.

Run once per environment (the manifest's `prepare` command) with GROUNDLOOP_CACHE_DIR set:
trains a fresh Policy on train-split problems (teacher forcing on prompt + answer, loss on the
answer tokens) with a fixed seed, then saves it atomically at policy.base_checkpoint_path().
Does nothing when it is already there.

The warm-up stops early on purpose: as soon as greedy accuracy on a fixed calibration set (from
the train split, never val or test) reaches TARGET_ACCURACY. Learning addition has a sharp
transition, so a fixed step count would land anywhere between 0 % and 100 % depending on the
platform's floating-point details; stopping on accuracy gives a base policy that is right about
TARGET_ACCURACY of the time everywhere, which leaves GRPO (train.py) room both ways.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

import policy
import task
import torch
import torch.nn.functional as F

MAX_STEPS = 3000
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
SEED = 1234
TARGET_ACCURACY = 0.3
CHECK_EVERY = 5
CALIBRATION_PROBLEMS = 256


def accuracy(model: policy.Policy, problems: list[task.Problem]) -> float:
    completions = policy.greedy_decode(model, task.encode_prompts(problems))
    return sum(task.reward(p, c) for p, c in zip(problems, completions, strict=True)) / len(
        problems
    )


def supervised_batch(problems: list[task.Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets for teacher forcing; only answer positions are scored."""
    rows = []
    for problem in problems:
        ids = task.encode(task.prompt_text(problem) + task.answer_text(problem))
        rows.append(ids + [task.PAD_ID] * (task.PROMPT_LEN + task.MAX_ANSWER_TOKENS + 1 - len(ids)))
    batch = torch.tensor(rows, dtype=torch.long)
    inputs, targets = batch[:, :-1], batch[:, 1:].clone()
    targets[:, : task.PROMPT_LEN - 1] = -100  # the prompt is given, not learned
    targets[targets == task.PAD_ID] = -100
    return inputs, targets


def main() -> None:
    target = policy.base_checkpoint_path()
    if target.is_file():
        print(f"prepare: base policy already at {target}", flush=True)
        return
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention
    generator = torch.Generator().manual_seed(SEED)
    calibration = task.sample_train_problems(
        CALIBRATION_PROBLEMS, torch.Generator().manual_seed(SEED + 1)
    )
    config = policy.PolicyConfig()
    model = policy.Policy(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    started = time.perf_counter()
    calibration_accuracy = 0.0
    for step in range(MAX_STEPS):
        inputs, targets = supervised_batch(task.sample_train_problems(BATCH_SIZE, generator))
        logits = model(inputs)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % CHECK_EVERY == 0:
            model.eval()
            calibration_accuracy = accuracy(model, calibration)
            model.train()
            if calibration_accuracy >= TARGET_ACCURACY:
                break
        if step % 100 == 0:
            print(
                f"prepare: step {step} loss {loss.item():.4f} calibration accuracy "
                f"{calibration_accuracy:.3f} {time.perf_counter() - started:.1f}s",
                flush=True,
            )
    print(
        f"prepare: stopped after {step + 1} steps, calibration accuracy {calibration_accuracy:.3f}",
        flush=True,
    )
    model.eval()
    print(
        f"prepare: base val accuracy {accuracy(model, task.eval_problems('val')):.3f}", flush=True
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".tmp{os.getpid()}")
    torch.save({"model": model.state_dict(), "config": asdict(config)}, partial)
    partial.replace(target)  # atomic: a concurrent reader sees no file or the whole file
    print(f"prepare: saved {target}", flush=True)


if __name__ == "__main__":
    main()
