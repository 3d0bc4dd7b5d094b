"""The GRPO update (trl's loss, our asynchronous rewards) on the warmed-up knobs-lm policy of
the synthetic environment: advantages, the clipped loss and k3 KL, learning a rewarded idea,
failed runs pushed down, and groups without signal left alone."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from trl.trainer.utils import nanstd

from groundloop.manifest import Manifest, load_manifest
from groundloop.rl_trainer.grpo import (
    completion_logps,
    group_advantages,
    group_batch,
    grpo_loss,
    sequence_mean,
)
from groundloop.rl_trainer.knob_policy import KnobLMPolicy
from groundloop.rl_trainer.policy import Completion, GRPOSettings, IdeaDraft, SamplingContext

ENVIRONMENTS = Path(__file__).resolve().parents[3] / "environments"
CONTEXT = SamplingContext(prompt_text="", past=[])


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(ENVIRONMENTS / "synthetic")


@pytest.fixture(scope="module")
def warmed(manifest: Manifest) -> bytes:
    policy = KnobLMPolicy(manifest, seed=0)
    policy.warm_up([], 300, seed=0)
    return policy.state_bytes()


def fresh(manifest: Manifest, warmed: bytes) -> KnobLMPolicy:
    policy = KnobLMPolicy(manifest, seed=0)
    policy.load_state_bytes(warmed)
    return policy


def written(policy: KnobLMPolicy, text: str) -> Completion:
    ids = policy.vocab.encode(text) + [policy.vocab.eos_id]
    return Completion(text=text, prompt_ids=[policy.vocab.bos_id], completion_ids=ids)


def sequence_logps(policy: KnobLMPolicy, completions: list[Completion]) -> list[float]:
    """Each completion's total log-probability under the policy."""
    batch = group_batch(completions, policy.pad_id, policy.device)
    with torch.no_grad():
        logps = completion_logps(policy.model, batch, 1.0)
    return (logps * batch.completion_mask).sum(-1).tolist()


def cosine(draft: IdeaDraft) -> bool:
    """The test's rewarded idea: any valid idea that switches SCHEDULE to cosine."""
    return bool(draft.valid and draft.knobs and draft.knobs.get("SCHEDULE") == "cosine")


def parameters(policy: KnobLMPolicy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


def test_advantages_are_trls_group_normalisation() -> None:
    rewards = [0.0, 1.0, 0.25, 0.0, 0.9]
    r = torch.tensor(rewards)
    expected = (r - r.mean()) / (nanstd(r) + 1e-4)
    assert group_advantages(rewards) == pytest.approx(expected.tolist(), abs=1e-6)
    assert group_advantages([0.7, 0.7, 0.7]) == [0.0, 0.0, 0.0]
    assert group_advantages([0.3]) == [0.0]
    with pytest.raises(ValueError, match="not a finite number"):
        group_advantages([0.1, math.nan])


def test_failed_runs_get_negative_advantage_and_lose_probability(
    manifest: Manifest, warmed: bytes
) -> None:
    advantages = group_advantages([0.0, 0.8, 0.0, 0.9])  # two failed runs, two that ran
    assert advantages[0] == advantages[2] < 0 < advantages[1] < advantages[3]
    policy = fresh(manifest, warmed)
    group = [
        written(policy, "WIDTH = 8"),  # failed
        written(policy, "MOMENTUM = 0.99"),
        written(policy, "LEARNING_RATE = 0.1"),  # failed
        written(policy, "SCHEDULE = linear"),
    ]
    before = sequence_logps(policy, group)
    stats = policy.update(group, [0.0, 0.8, 0.0, 0.9], GRPOSettings(), CONTEXT)
    after = sequence_logps(policy, group)
    change = [a - b for a, b in zip(after, before, strict=True)]
    assert change[0] < 0 and change[2] < 0 and change[1] > 0 and change[3] > 0, change
    assert stats.optimizer_steps == 2 and stats.mean_completion_tokens == 4.0


def test_loss_is_trls_clipped_objective_with_k3_kl() -> None:
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0 has a padded last token
    adv = torch.tensor([1.0, -1.0])
    loss, kl = grpo_loss(old, old, old, mask, adv, clip_eps=0.2, kl_coef=0.04)
    assert float(loss) == pytest.approx(0.0) and float(kl) == pytest.approx(0.0)
    # Ratio 1.5 everywhere: clipped to 1.2 for the positive advantage (-min(1.5, 1.2) = -1.2),
    # not for the negative one (-min(-1.5, -1.2) = 1.5); mean over rows (-1.2 + 1.5) / 2.
    moved = old + math.log(1.5)
    loss, _ = grpo_loss(moved, old, None, mask, adv, clip_eps=0.2, kl_coef=0.04)
    assert float(loss) == pytest.approx(0.15, abs=1e-6)
    # k3 with ref - logp = 1: e - 2 per token, weighted by kl_coef, padded tokens ignored.
    loss, kl = grpo_loss(old, old, old + 1.0, mask, torch.zeros(2), clip_eps=0.2, kl_coef=0.5)
    assert float(kl) == pytest.approx(math.e - 2, abs=1e-6)
    assert float(loss) == pytest.approx(0.5 * (math.e - 2), abs=1e-6)
    assert float(sequence_mean(torch.tensor([[1.0, 3.0, 100.0]]), mask[:1])) == 2.0


def test_a_few_steps_raise_the_share_of_the_rewarded_idea(
    manifest: Manifest, warmed: bytes
) -> None:
    policy = fresh(manifest, warmed)
    settings = GRPOSettings()  # the defaults the service uses
    target = [written(policy, "SCHEDULE = cosine")]

    def share() -> float:
        samples = policy.sample(CONTEXT, 200, seed=999)
        return sum(cosine(policy.to_idea(c)) for c in samples) / len(samples)

    before, target_before, start = share(), sequence_logps(policy, target)[0], parameters(policy)
    seconds, steps = [], 0
    for step in range(12):
        group = policy.sample(CONTEXT, 8, seed=step)
        rewards = [float(cosine(policy.to_idea(c))) for c in group]
        t0 = time.perf_counter()
        stats = policy.update(group, rewards, settings, CONTEXT)
        seconds.append(time.perf_counter() - t0)
        steps += stats.optimizer_steps
    after, target_after = share(), sequence_logps(policy, target)[0]
    print(
        f"share of SCHEDULE=cosine ideas {before:.3f} -> {after:.3f}; log p(target) "
        f"{target_before:.2f} -> {target_after:.2f}; {steps} optimiser steps, "
        f"{1000 * sum(seconds) / len(seconds):.0f} ms per update; last kl {stats.kl:.3f}"
    )
    assert after >= before + 0.2
    assert target_after > target_before + 0.3
    assert steps > 0 and stats.kl > 0
    end = parameters(policy)
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_a_group_of_equal_rewards_changes_nothing(manifest: Manifest, warmed: bytes) -> None:
    policy = fresh(manifest, warmed)
    group = policy.sample(CONTEXT, 8, seed=3)
    policy.update(group, [1.0, 0, 0, 0, 1.0, 0, 0, 0], GRPOSettings(), CONTEXT)  # Adam has moments
    saved, weights = policy.state_bytes(), parameters(policy)
    for rewards in ([0.0] * 8, [0.6] * 8):  # every run failed; every run scored the same
        stats = policy.update(group, rewards, GRPOSettings(), CONTEXT)
        assert stats.advantages == [0.0] * 8 and stats.optimizer_steps == 0
        assert stats.grad_norm == 0.0 and stats.kl > 0  # measured, not optimised
    assert policy.state_bytes() == saved  # weights, optimizer moments and step count
    assert all(torch.equal(v, parameters(policy)[k]) for k, v in weights.items())


def test_a_group_must_share_its_prompt_and_have_one_reward_each(
    manifest: Manifest, warmed: bytes
) -> None:
    policy = fresh(manifest, warmed)
    a, b = written(policy, "WIDTH = 8"), written(policy, "WIDTH = 14")
    with pytest.raises(ValueError, match="one reward per completion"):
        policy.update([a, b], [1.0], GRPOSettings(), CONTEXT)
    other = Completion(
        text=b.text, prompt_ids=[policy.vocab.bos_id] * 2, completion_ids=b.completion_ids
    )
    with pytest.raises(ValueError, match="different prompts"):
        policy.update([a, other], [1.0, 0.0], GRPOSettings(), CONTEXT)
    with pytest.raises(ValueError, match="clip_eps"):
        GRPOSettings(clip_eps=1.5)
