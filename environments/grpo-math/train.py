"""GRPO from scratch on Qwen2.5-Math-1.5B with MATH: the baseline recipe that ideas edit.

Three editable files. This one: hyperparameters and the training loop (sample problems, roll
out groups, grade them, advantages, micro-batched clipped updates, checkpoints). It imports
sampler.py (rollouts: vLLM or HF generate, SAMPLING_TEMPERATURE, stopping at </answer>) and
loss.py (the GRPO pieces: group-normalised advantages, tokenized rollouts with their response
mask, per-token log-probabilities, the clipped objective, LOSS_TYPE). The defaults are the
paper's GRPO baseline: 20 steps, 128 problems x 8 samples per step, r1_zero prompt and reward,
lr 1e-5, clipped objective (0.2), micro-batches of 4 with 16 accumulation steps.

    python train.py                       # one GPU; vLLM rollouts when installed, else HF generate
    GROUNDLOOP_SMOKE=1 python train.py    # tiny random Qwen2 + byte tokenizer on CPU, seconds

Contract with the protected files (keep it when editing): start from data.load_base_model(),
save the policy with harness.save_checkpoint(model, step, clock) (the evaluation scores every
saved checkpoint on the validation split and keeps the best; at most 4 are kept, the last slot
always holds the newest) and finish within the training clock (harness, 50 minutes).
The evaluation prompts with data.format_prompt and grades with grader.grade; the policy must
answer in "<think> ... </think> <answer> ... </answer>" form to be scored.
Reads GROUNDLOOP_SEED, GROUNDLOOP_DEVICE, GROUNDLOOP_SMOKE, GRPO_MATH_ENGINE (vllm | hf).
"""

from __future__ import annotations

import importlib.util
import os
import random
import time

import torch

import data
import grader
import harness
from loss import (
    LOSS_TYPE,
    group_normalized_advantages,
    policy_loss,
    token_log_probs,
    tokenize_rollouts,
)
from sampler import push_weights_to_vllm, sample_hf, sample_vllm, start_vllm

# ----------------------------------------------------------------------------- hyperparameters
LEARNING_RATE = 1e-5
GRPO_STEPS = 20
ROLLOUT_PROBLEMS = 128  # problems sampled per GRPO step
GROUP_SIZE = 8  # responses per problem (the group the advantages are normalised over)
MAX_NEW_TOKENS = 1024
MIN_NEW_TOKENS = 4
EPOCHS_PER_ROLLOUT = 1  # passes over each rollout batch
MICRO_BATCH_SIZE = 4
GRADIENT_ACCUMULATION_STEPS = 16  # micro-batches per optimiser step
WEIGHT_DECAY = 0.0
BETA1 = 0.9
BETA2 = 0.95
GRAD_CLIP = 1.0
CHECKPOINT_EVERY = 5  # GRPO steps between saved checkpoints
GRADIENT_CHECKPOINTING = True

SMOKE = dict(
    GRPO_STEPS=2,
    ROLLOUT_PROBLEMS=4,
    GROUP_SIZE=4,
    MAX_NEW_TOKENS=12,
    MIN_NEW_TOKENS=1,
    MICRO_BATCH_SIZE=4,
    GRADIENT_ACCUMULATION_STEPS=2,
    CHECKPOINT_EVERY=1,
    LEARNING_RATE=1e-3,
)


# ------------------------------------------------------------------------------ training loop
def pick_device() -> torch.device:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda" if os.environ.get("GROUNDLOOP_DEVICE", default) == "cuda" else "cpu")


def grpo_update(
    policy, optimizer, rollouts: dict, advantages: torch.Tensor, cfg: dict, device: torch.device
) -> dict[str, float]:
    """EPOCHS_PER_ROLLOUT passes of micro-batched, gradient-accumulated policy updates."""
    micro = cfg["MICRO_BATCH_SIZE"]
    slices = [slice(i, i + micro) for i in range(0, len(advantages), micro)]

    def batch_log_probs(s: slice) -> torch.Tensor:
        return token_log_probs(
            policy, rollouts["input_ids"][s].to(device), rollouts["attention_mask"][s].to(device)
        )

    with torch.no_grad():  # the sampling policy's log-probs, for the clipped ratio
        policy.eval()
        old_log_probs = [batch_log_probs(s) for s in slices]
    policy.train()
    losses, clip_fractions = [], []
    for _ in range(EPOCHS_PER_ROLLOUT):
        for index, s in enumerate(slices):
            loss, stats = policy_loss(
                batch_log_probs(s),
                old_log_probs[index],
                advantages[s].to(device),
                rollouts["response_mask"][s].to(device),
            )
            (loss / cfg["GRADIENT_ACCUMULATION_STEPS"]).backward()
            losses.append(loss.item())
            clip_fractions.append(stats["clip_fraction"])
            last = index == len(slices) - 1
            if (index + 1) % cfg["GRADIENT_ACCUMULATION_STEPS"] == 0 or last:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), GRAD_CLIP)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return {"loss": sum(losses) / len(losses), "clip": sum(clip_fractions) / len(clip_fractions)}


def main() -> None:
    cfg = {name: globals()[name] for name in SMOKE} | (SMOKE if data.smoke_mode() else {})
    seed = int(os.environ.get("GROUNDLOOP_SEED", "0"))
    random.seed(seed)
    torch.manual_seed(seed)
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    clock = harness.TrainingClock()
    tokenizer = data.load_tokenizer()
    policy = data.load_base_model(
        device, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    if GRADIENT_CHECKPOINTING and device.type == "cuda":
        policy.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(
        policy.parameters(),
        lr=cfg["LEARNING_RATE"],
        betas=(BETA1, BETA2),
        weight_decay=WEIGHT_DECAY,
    )
    use_vllm = (
        os.environ.get("GRPO_MATH_ENGINE", "vllm") == "vllm"
        and device.type == "cuda"
        and not data.smoke_mode()
        and importlib.util.find_spec("vllm") is not None
    )
    llm = start_vllm(seed) if use_vllm else None
    problems = data.load_problems("train")
    print(
        f"GRPO on {len(problems)} problems, rollouts with {'vLLM' if llm else 'HF generate'}, "
        f"budget {clock.budget:g} s",
        flush=True,
    )

    last_saved, completed, step_seconds = 0, 0, 0.0
    for step in range(1, cfg["GRPO_STEPS"] + 1):
        if step > 1 and clock.seconds_left() < 1.5 * step_seconds:
            print(
                f"stopping before step {step}: {clock.seconds_left():.0f} s left, a step "
                f"takes {step_seconds:.0f} s",
                flush=True,
            )
            break
        began = time.monotonic()
        batch = random.sample(problems, cfg["ROLLOUT_PROBLEMS"])
        group = cfg["GROUP_SIZE"]
        prompts = [data.format_prompt(p["problem"]) for p in batch for _ in range(group)]
        answers = [p["answer"] for p in batch for _ in range(group)]
        if llm:
            responses = sample_vllm(llm, prompts, cfg)
        else:
            responses = sample_hf(policy, tokenizer, prompts, cfg, device)
        scored = [grader.reward(r, a) for r, a in zip(responses, answers, strict=True)]
        rewards = torch.tensor([s["reward"] for s in scored])
        if LOSS_TYPE == "no_baseline":
            advantages = rewards.clone()
        else:
            advantages = group_normalized_advantages(rewards, group)
        rollouts = tokenize_rollouts(tokenizer, prompts, responses)
        stats = grpo_update(policy, optimizer, rollouts, advantages, cfg, device)
        if llm:
            push_weights_to_vllm(llm, policy)
        step_seconds, completed = time.monotonic() - began, step
        format_rate = sum(s["format_reward"] for s in scored) / len(scored)
        print(
            f"step {step} | reward {rewards.mean():.3f} | format {format_rate:.3f} | loss "
            f"{stats['loss']:.4f} | clip {stats['clip']:.3f} | {step_seconds:.1f} s | "
            f"{clock.training_seconds():.0f} s total",
            flush=True,
        )
        if step % cfg["CHECKPOINT_EVERY"] == 0:
            harness.save_checkpoint(policy, step, clock)
            last_saved = step
    if last_saved != completed:
        harness.save_checkpoint(policy, completed, clock)


if __name__ == "__main__":
    main()
