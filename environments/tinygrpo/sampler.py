"""tinygrpo rollouts (editable): how completions are drawn from the policy during training.

train.py calls sample_completions once per step on PROMPTS_PER_STEP x GROUP_SIZE prompts and
scores what it returns with the protected verifier (task.reward). Change how rollouts are
sampled here (temperature, top-k/top-p, forcing or forbidding tokens); the answer format is
fixed by task.py: digits least significant first, then the end mark, PAD after it.
"""

from __future__ import annotations

import policy
import task
import torch
import torch.nn.functional as F

TEMPERATURE = 1.0


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
