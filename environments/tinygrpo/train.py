"""tinygrpo: GRPO from scratch on a tiny char-level policy that adds 2-3 digit numbers.

Three editable files. This one: config and the training loop (sample problems, roll out
groups, reward them, advantages, INNER_EPOCHS optimiser passes, save). It imports sampler.py
(how completions are sampled, TEMPERATURE) and loss.py (per-token log-probabilities, group-
normalised advantages, the clipped policy-gradient objective with an optional KL penalty to
the reference policy). Protected, and imported here: task.py (problems, tokenizer, the exact-
match verifier), policy.py (the architecture and the base checkpoint that prepare.py built).
The protected evaluate.py scores what this file saves, out/policy.pt, by greedy decoding on a
validation split that train.py never samples from.

Run: python train.py [--smoke], after `python prepare.py`. Reads GROUNDLOOP_SEED (default 0),
GROUNDLOOP_DEVICE (cpu or cuda), GROUNDLOOP_SMOKE=1 and GROUNDLOOP_CACHE_DIR (the base policy).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import policy
import task
import torch
from loss import KL_COEF, advantages, completion_logprobs, grpo_loss
from sampler import sample_completions

# ----------------------------------------------------------------------------- config
STEPS = 400  # one batch of rollouts (PROMPTS_PER_STEP x GROUP_SIZE) per step
PROMPTS_PER_STEP = 16
GROUP_SIZE = 8  # completions sampled per prompt; advantages are relative within a group
LEARNING_RATE = 3e-4
WEIGHT_DECAY = 0.0
GRAD_CLIP = 1.0  # 0 disables clipping
INNER_EPOCHS = 2  # optimisation passes over each batch of rollouts (>1 makes clipping matter)
LOG_EVERY = 10
THREADS = 1  # fixed, so a seed gives the same numbers on any machine


# ----------------------------------------------------------------------------- loop
def main() -> None:
    smoke = "--smoke" in sys.argv or os.environ.get("GROUNDLOOP_SMOKE") == "1"
    seed = int(os.environ.get("GROUNDLOOP_SEED", "0"))
    device = os.environ.get("GROUNDLOOP_DEVICE", "cpu")
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    if device == "cpu":
        torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(seed)

    model = policy.load_policy(policy.base_checkpoint_path(), device)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = 2 if smoke else STEPS
    print(
        f"seed {seed} device {device} steps {steps} rollouts/step {PROMPTS_PER_STEP * GROUP_SIZE}",
        flush=True,
    )

    started = time.perf_counter()
    for step in range(steps):
        problems = task.sample_train_problems(PROMPTS_PER_STEP, generator)
        prompts = task.encode_prompts(problems).repeat_interleave(GROUP_SIZE, dim=0).to(device)
        model.eval()
        completions = sample_completions(model, prompts, generator)
        rewards = torch.tensor(
            [task.reward(problems[i // GROUP_SIZE], c) for i, c in enumerate(completions.cpu())]
        ).view(PROMPTS_PER_STEP, GROUP_SIZE)
        advantage = advantages(rewards).flatten().to(device)
        # Score the end mark too; everything after it is padding.
        mask = (completions != task.PAD_ID).float()
        with torch.no_grad():
            old_logprobs = completion_logprobs(model, prompts, completions)
            ref_logprobs = (
                completion_logprobs(reference, prompts, completions) if KL_COEF > 0 else None
            )

        model.train()
        for _ in range(INNER_EPOCHS):
            loss = grpo_loss(
                completion_logprobs(model, prompts, completions),
                old_logprobs,
                ref_logprobs,
                advantage,
                mask,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if GRAD_CLIP > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()

        if step % LOG_EVERY == 0 or step == steps - 1:
            print(
                f"step {step:4d}/{steps} reward {rewards.mean().item():.3f} loss {loss.item():+.4f} "
                f"{time.perf_counter() - started:6.1f}s",
                flush=True,
            )

    out = Path("out")
    out.mkdir(exist_ok=True)
    torch.save({"model": model.state_dict(), "config": asdict(model.config)}, out / "policy.pt")
    print(
        f"trained {steps} steps in {time.perf_counter() - started:.1f}s; saved {out / 'policy.pt'}",
        flush=True,
    )


if __name__ == "__main__":
    main()
