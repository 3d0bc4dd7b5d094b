"""The GRPO update on one group of completions, following trl's GRPOTrainer loss.

Why not trl's GRPOTrainer itself: it generates, scores and optimises inside one synchronous
loop, calling reward functions right after generation. Our rewards are execution results that
arrive minutes (or hours) later as RunCompleted events, possibly out of order and after a
restart. So the service keeps the sampled token ids and calls `grpo_update` once a group's
rewards are in. We reuse trl's `selective_log_softmax` and reproduce its "grpo" loss:

- advantages: group-normalised (r - mean) / (std + 1e-4), std with Bessel's correction as
  trl's nanstd; a group of equal rewards has zero advantages and is not optimised (see below);
- per-token importance ratio pi/pi_old, clipped to [1 - clip_eps, 1 + clip_eps], loss
  -min(ratio * A, clipped * A) (PPO's pessimistic bound);
- `inner_steps` optimiser steps per group (trl's num_iterations), with the old log-probs
  taken once before the first step, so the first step is exactly on-policy;
- KL to a frozen reference with the k3 estimator exp(ref - logp) - (ref - logp) - 1, weight
  `kl_coef` (trl's beta), added per token;
- per-token loss averaged over each sequence's completion tokens, then over the group;
- logits divided by the sampling temperature before the log-softmax, as trl does.

A group whose rewards are all equal carries no signal. trl would still step, letting AdamW's
momentum keep moving the weights along earlier gradients and the KL term alone pull them; we
skip the optimiser instead (DAPO's dynamic sampling drops such groups for the same reason):
the weights and the optimiser state stay as they were and UpdateStats says 0 optimiser steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from trl.trainer.utils import selective_log_softmax

from groundloop.rl_trainer.policy import Completion, GRPOSettings, UpdateStats

ADVANTAGE_EPS = 1e-4  # trl's constant in (r - mean) / (std + eps)


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """(r - mean) / (std + 1e-4) within the group; all zero when the rewards are all equal."""
    if not rewards:
        raise ValueError("a GRPO group needs at least one reward")
    for value in rewards:
        if not math.isfinite(value):
            raise ValueError(f"reward {value!r} is not a finite number; failed runs earn 0")
    mean = sum(rewards) / len(rewards)
    if all(r == rewards[0] for r in rewards) or len(rewards) < 2:
        return [0.0] * len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return [(r - mean) / (std + ADVANTAGE_EPS) for r in rewards]


@dataclass(frozen=True)
class TokenBatch:
    """Prompt + completion token ids of one group, right-padded to a rectangle."""

    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T], 1 on sampled tokens (stop token included)
    prompt_length: int


def token_batch(
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
) -> TokenBatch:
    """One prompt shared by every completion (a group is sampled from one context)."""
    if not completions:
        raise ValueError("a GRPO group needs at least one completion")
    width = max(1, max(len(c) for c in completions))
    ids = [list(c) + [pad_id] * (width - len(c)) for c in completions]
    mask = [[1] * len(c) + [0] * (width - len(c)) for c in completions]
    completion_ids = torch.tensor(ids, dtype=torch.long, device=device)
    completion_mask = torch.tensor(mask, dtype=torch.long, device=device)
    prompt = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    prompt = prompt.unsqueeze(0).expand(len(completions), -1)
    return TokenBatch(
        input_ids=torch.cat([prompt, completion_ids], dim=1),
        attention_mask=torch.cat([torch.ones_like(prompt), completion_mask], dim=1),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        prompt_length=len(prompt_ids),
    )


def group_batch(completions: Sequence[Completion], pad_id: int, device: torch.device) -> TokenBatch:
    prompts = {tuple(c.prompt_ids) for c in completions}
    if len(prompts) != 1:
        raise ValueError(
            f"a GRPO group is sampled from one prompt, but these completions have {len(prompts)} "
            "different prompts; update each group separately"
        )
    empty = [i for i, c in enumerate(completions) if not c.completion_ids]
    if empty:
        raise ValueError(f"completions {empty} have no tokens; they cannot be scored")
    return token_batch(
        completions[0].prompt_ids, [c.completion_ids for c in completions], pad_id, device
    )


def completion_logps(model: nn.Module, batch: TokenBatch, temperature: float) -> torch.Tensor:
    """Per-token log-probabilities [B, T] of the completion tokens under `model`."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # Position i predicts token i + 1: the completion's tokens come from the positions
    # prompt_length - 1 ... end - 1.
    logits = logits[:, batch.prompt_length - 1 : -1, :].float()
    return selective_log_softmax(logits, batch.completion_ids, temperature=temperature)


def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """trl's "grpo" loss and the mean k3 KL (per sequence, then over the group)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if ref_logps is not None:
        delta = ref_logps - logps
        per_token_kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_coef * per_token_kl
        kl = sequence_mean(per_token_kl, mask).mean()
    else:
        kl = torch.zeros((), device=logps.device)
    mask_f = mask.to(logps.dtype)
    return sequence_mean(per_token, mask_f).mean(), kl.detach()


def grpo_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TokenBatch,
    rewards: Sequence[float],
    settings: GRPOSettings,
    reference_logps: Callable[[TokenBatch], torch.Tensor] | None,
) -> UpdateStats:
    """One GRPO step on one group: `settings.inner_steps` optimiser steps (none when every
    advantage is zero). `reference_logps` gives the frozen reference's per-token log-probs
    (None: no KL term)."""
    if len(rewards) != batch.completion_ids.shape[0]:
        raise ValueError(
            f"{len(rewards)} rewards for {batch.completion_ids.shape[0]} completions; "
            "a GRPO group needs exactly one reward per completion"
        )
    advantages = group_advantages(rewards)
    adv = torch.tensor(advantages, dtype=torch.float32, device=batch.input_ids.device)
    mask = batch.completion_mask.float()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for group in optimizer.param_groups:  # settings may change between steps
        group["lr"] = settings.learning_rate
        group["weight_decay"] = settings.weight_decay
    mean_tokens = float(mask.sum(-1).mean().item())
    use_kl = settings.kl_coef > 0 and reference_logps is not None
    model.eval()  # no dropout: the first inner step must see exactly the old policy
    with torch.no_grad():
        old = completion_logps(model, batch, settings.temperature)
        ref = reference_logps(batch) if use_kl and reference_logps is not None else None
    if not any(advantages):
        loss, kl = grpo_loss(old, old, ref, mask, adv, settings.clip_eps, settings.kl_coef)
        return UpdateStats(float(loss), float(kl), 0.0, advantages, mean_tokens, 0)
    losses, kls, norms = [], [], []
    for _ in range(settings.inner_steps):
        logps = completion_logps(model, batch, settings.temperature)
        loss, kl = grpo_loss(logps, old, ref, mask, adv, settings.clip_eps, settings.kl_coef)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        kls.append(float(kl))
        norms.append(float(norm))
    optimizer.zero_grad(set_to_none=True)
    steps = settings.inner_steps
    return UpdateStats(
        loss=sum(losses) / steps,
        kl=sum(kls) / steps,
        grad_norm=sum(norms) / steps,
        advantages=advantages,
        mean_completion_tokens=mean_tokens,
        optimizer_steps=steps,
    )


def weighted_nll(model: nn.Module, batch: TokenBatch, weights: torch.Tensor) -> torch.Tensor:
    """Supervised loss for warm-up: each sequence's mean token NLL, weighted, normalised by
    the total weight (reward-weighted regression on whole ideas)."""
    logps = completion_logps(model, batch, 1.0)
    per_sequence = -sequence_mean(logps, batch.completion_mask.float())
    return (per_sequence * weights).sum() / weights.sum().clamp(min=1e-12)
