"""tinygrpo objective (editable): per-token log-probabilities, advantages and the GRPO loss.

train.py turns each step's rewards (P prompts x G completions) into advantages here, scores the
sampled completions under the policy (and under the frozen base policy when KL_COEF > 0) and
minimises grpo_loss over INNER_EPOCHS passes. Change advantage estimation, the surrogate, the
clipping, the KL penalty or how the loss is averaged here.
"""

from __future__ import annotations

import policy
import torch

ADV_NORM = "group_std"  # group_std: (r - mean) / std | group_mean: r - mean | batch_std
CLIP_EPS = 0.2
KL_COEF = 0.0  # weight of the k3 KL estimate to the frozen base policy
LOSS_AGG = "sequence"  # sequence: mean over tokens then sequences (GRPO) | token: over all tokens


def completion_logprobs(
    model: policy.Policy, prompts: torch.Tensor, completions: torch.Tensor
) -> torch.Tensor:
    """Per-token log-probabilities (N, L) of `completions` after `prompts` under `model`."""
    sequence = torch.cat([prompts, completions], dim=1)
    logits = model(sequence[:, :-1])[:, prompts.shape[1] - 1 :]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, completions[..., None]).squeeze(-1)


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
