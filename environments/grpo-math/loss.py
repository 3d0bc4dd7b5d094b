"""grpo-math objective (editable): advantages, per-token log-probabilities and the policy loss.

train.py turns each step's rewards into advantages with group_normalized_advantages (or uses
the raw rewards when LOSS_TYPE is no_baseline), tokenizes the rollouts with tokenize_rollouts,
and in its micro-batched update minimises policy_loss on token_log_probs of the response
tokens. Change advantage estimation, the surrogate, clipping or how the loss is averaged here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPE = "grpo_clip"  # grpo_clip | reinforce_with_baseline | no_baseline
CLIP_RANGE = 0.2
NORMALIZE_BY_STD = True
ADVANTAGE_EPS = 1e-6


def group_normalized_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_by_std: bool = NORMALIZE_BY_STD,
    eps: float = ADVANTAGE_EPS,
) -> torch.Tensor:
    """Each reward minus its group's mean (divided by the group's std when asked)."""
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if normalize_by_std:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.flatten()


def tokenize_rollouts(
    tokenizer, prompts: list[str], responses: list[str]
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response ids; `response_mask` marks the targets that are response tokens."""
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    response_ids = [tokenizer.encode(r, add_special_tokens=False) for r in responses]
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True))
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    response_mask = torch.zeros((len(prompts), width - 1), dtype=torch.float32)
    for row, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention[row, : len(p) + len(r)] = 1
        response_mask[row, len(p) - 1 : len(p) + len(r) - 1] = 1.0  # target t+1 predicted at t
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response_mask}


def token_log_probs(policy, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(token_{t+1} | tokens_<=t) for every position, shape (B, T-1)."""
    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    return torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, 1:, None]).squeeze(-1)


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-sequence mean over response tokens of the per-token loss, averaged over the batch."""
    adv = advantages[:, None]
    if LOSS_TYPE == "grpo_clip":
        ratio = torch.exp(log_probs - old_log_probs)
        clipped = torch.clamp(ratio, 1 - CLIP_RANGE, 1 + CLIP_RANGE)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
        clip_fraction = (
            (ratio * adv > clipped * adv).float() * response_mask
        ).sum() / response_mask.sum().clamp(min=1)
    elif LOSS_TYPE in ("reinforce_with_baseline", "no_baseline"):
        per_token, clip_fraction = -adv * log_probs, torch.zeros(())
    else:
        raise ValueError(
            f"LOSS_TYPE {LOSS_TYPE!r}: use grpo_clip, reinforce_with_baseline or no_baseline"
        )
    per_sequence = (per_token * response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)
    return per_sequence.mean(), {"clip_fraction": clip_fraction.item()}
