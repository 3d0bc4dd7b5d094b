"""tinygrpo: GRPO from scratch on a tiny char-level policy that adds 2-3 digit numbers.

Top to bottom: config, rollouts (group sampling), rewards, group-normalised advantages, the
clipped policy-gradient objective with an optional KL penalty to the reference policy, the loop.
Ideas edit this file. Protected, and imported here: task.py (problems, tokenizer, the exact-
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
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config
STEPS = 400  # one batch of rollouts (PROMPTS_PER_STEP x GROUP_SIZE) per step
PROMPTS_PER_STEP = 16
GROUP_SIZE = 8  # completions sampled per prompt; advantages are relative within a group
TEMPERATURE = 1.0
LEARNING_RATE = 3e-4
WEIGHT_DECAY = 0.0
GRAD_CLIP = 1.0  # 0 disables clipping
INNER_EPOCHS = 2  # optimisation passes over each batch of rollouts (>1 makes clipping matter)
CLIP_EPS = 0.2
KL_COEF = 0.0  # weight of the k3 KL estimate to the frozen base policy
ADV_NORM = "group_std"  # group_std: (r - mean) / std | group_mean: r - mean | batch_std
LOSS_AGG = "sequence"  # sequence: mean over tokens then sequences (GRPO) | token: over all tokens
LOG_EVERY = 10
THREADS = 1  # fixed, so a seed gives the same numbers on any machine


# ----------------------------------------------------------------------------- rollouts
@torch.no_grad()
def sample_completions(
    model: policy.Policy, prompts: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Sample completions (N, MAX_ANSWER_TOKENS) at TEMPERATURE; PAD after the end mark."""
    sequence = prompts
    done = torch.zeros(len(prompts), dtype=torch.bool, device=prompts.device)
    for _ in range(task.MAX_ANSWER_TOKENS):
        logits = model(sequence)[:, -1] / TEMPERATURE
        # PAD is never a valid choice before the end mark.
        logits[:, task.PAD_ID] = float("-inf")
        probs = F.softmax(logits, dim=-1)
        next_id = (
            torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(prompts.device)
        )
        next_id = torch.where(done, torch.full_like(next_id, task.PAD_ID), next_id)
        done |= next_id == task.EOS_ID
        sequence = torch.cat([sequence, next_id[:, None]], dim=1)
    return sequence[:, prompts.shape[1] :]


def completion_logprobs(
    model: policy.Policy, prompts: torch.Tensor, completions: torch.Tensor
) -> torch.Tensor:
    """Per-token log-probabilities (N, L) of `completions` after `prompts` under `model`."""
    sequence = torch.cat([prompts, completions], dim=1)
    logits = model(sequence[:, :-1])[:, prompts.shape[1] - 1 :]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, completions[..., None]).squeeze(-1)


# ----------------------------------------------------------------------------- advantages
def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Rewards (P, G) -> advantages (P, G), normalised within each prompt's group."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if ADV_NORM == "group_std":
        return centred / (rewards.std(dim=1, keepdim=True) + 1e-4)
    if ADV_NORM == "group_mean":
        return centred
    if ADV_NORM == "batch_std":
        return centred / (rewards.std() + 1e-4)
    raise ValueError(f"ADV_NORM={ADV_NORM!r}; use group_std, group_mean or batch_std")


# ----------------------------------------------------------------------------- objective
def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantage, mask) -> torch.Tensor:
    """Clipped surrogate (PPO) with per-sequence advantages, plus KL_COEF * k3 KL to reference."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantage[:, None]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS) * adv)
    per_token = -surrogate
    if KL_COEF > 0:
        log_ratio_ref = ref_logprobs - logprobs
        per_token = per_token + KL_COEF * (torch.exp(log_ratio_ref) - log_ratio_ref - 1)
    if LOSS_AGG == "sequence":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if LOSS_AGG == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    raise ValueError(f"LOSS_AGG={LOSS_AGG!r}; use sequence or token")


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
