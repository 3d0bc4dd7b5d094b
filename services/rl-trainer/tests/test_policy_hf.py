"""The hf policy on a tiny randomly initialised Qwen2 (2 layers, hidden 32) with a byte-level
tokenizer built in code, both saved to tmp_path: sampling, a LoRA GRPO step, exact checkpoints,
and the error for a model that is not on disk. Nothing is downloaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from groundloop.manifest import load_manifest
from groundloop.rl_trainer.hf_policy import HFPolicy, PolicyLoadError
from groundloop.rl_trainer.policy import GRPOSettings, SamplingContext, build_policy
from tests.tiny_hf_model import save_tiny_qwen2

ENVIRONMENTS = Path(__file__).resolve().parents[3] / "environments"
SETTINGS = GRPOSettings(learning_rate=1e-2, max_new_tokens=12, inner_steps=2)
CONTEXT = SamplingContext(prompt_text="Propose one idea.", past=[("raise the lr", 0.5)])


def bracket_ideas(text: str) -> list[tuple[str, str]]:
    """A small stand-in for the ideator's parser: `[Experiment] title [End]` blocks."""
    return [(m.strip(), m.strip()) for m in re.findall(r"\[Experiment\](.*?)\[End\]", text, re.S)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


def make(model_dir: Path, seed: int = 0, lora_rank: int = 4) -> HFPolicy:
    manifest = load_manifest(ENVIRONMENTS / "synthetic")
    policy = build_policy(
        f"hf:{model_dir}", manifest, seed, parse_ideas=bracket_ideas, lora_rank=lora_rank
    )
    assert isinstance(policy, HFPolicy)
    return policy


def adapter(policy: HFPolicy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.model_state().items()}


def base_weights(policy: HFPolicy) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone()
        for name, p in policy.model.named_parameters()
        if "lora_" not in name
    }


def test_samples_with_chat_template_and_past_deterministically(model_dir: Path) -> None:
    policy = make(model_dir)
    prompt = policy.tokenizer.decode(policy.prompt_ids(CONTEXT))
    assert prompt.startswith("<|im_start|>user\nPropose one idea.")
    assert "reward 0.5: raise the lr" in prompt and prompt.endswith("<|im_start|>assistant\n")
    first = policy.sample(CONTEXT, 4, seed=3, settings=SETTINGS)
    again = policy.sample(CONTEXT, 4, seed=3, settings=SETTINGS)
    other = policy.sample(CONTEXT, 4, seed=4, settings=SETTINGS)
    assert [c.completion_ids for c in first] == [c.completion_ids for c in again]
    assert [c.completion_ids for c in first] != [c.completion_ids for c in other]
    assert all(0 < len(c.completion_ids) <= SETTINGS.max_new_tokens for c in first)
    assert first[0].text == policy.tokenizer.decode(
        first[0].completion_ids, skip_special_tokens=True
    )


def test_to_idea_keeps_the_first_parsed_idea(model_dir: Path) -> None:
    policy = make(model_dir)
    [completion] = policy.sample(CONTEXT, 1, seed=0, settings=SETTINGS)
    assert not policy.to_idea(completion).valid  # random bytes hold no [Experiment] block
    good = type(completion)(
        text="[Experiment] cosine decay [End] [Experiment] second [End]",
        prompt_ids=completion.prompt_ids,
        completion_ids=completion.completion_ids,
    )
    draft = policy.to_idea(good)
    assert draft.valid and draft.title == "cosine decay" and draft.knobs is None


def test_lora_update_moves_only_the_adapter_and_resumes_exactly(model_dir: Path) -> None:
    policy = make(model_dir)
    group = policy.sample(CONTEXT, 4, seed=1, settings=SETTINGS)
    rewards = [1.0, 0.0, 0.5, 0.0]
    base, before = base_weights(policy), adapter(policy)
    stats = policy.update(group, rewards, SETTINGS, CONTEXT)
    assert stats.optimizer_steps == 2 and stats.grad_norm > 0
    after = adapter(policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(base[k], v) for k, v in base_weights(policy).items())
    # With the adapter moved, the reference (adapter disabled) now differs: KL > 0.
    assert policy.update(group, rewards, SETTINGS, CONTEXT).kl > 0

    saved = policy.state_bytes()
    assert len(saved) < 200_000  # adapter + optimizer, not the model
    twin = make(model_dir, seed=7)  # another adapter init: everything must come from the bytes
    twin.load_state_bytes(saved)
    group2 = policy.sample(CONTEXT, 4, seed=2, settings=SETTINGS)
    assert [c.completion_ids for c in twin.sample(CONTEXT, 4, seed=2, settings=SETTINGS)] == [
        c.completion_ids for c in group2
    ]
    policy.update(group2, [0.0, 1.0, 1.0, 0.0], SETTINGS, CONTEXT)
    twin.update(group2, [0.0, 1.0, 1.0, 0.0], SETTINGS, CONTEXT)
    mine, theirs = adapter(policy), adapter(twin)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_warm_up_needs_the_prompt_and_lowers_the_loss(model_dir: Path) -> None:
    policy = make(model_dir)
    examples = [("[Experiment] use cosine decay [End]", 1.0), ("[Experiment] bad [End]", 0.2)]
    assert policy.warm_up([], 10, seed=0) == 0.0  # nothing to imitate: unchanged
    with pytest.raises(ValueError, match="context=SamplingContext"):
        policy.warm_up(examples, 2, seed=0)
    start = policy.warm_up(examples, 0, seed=0, context=CONTEXT)
    end = policy.warm_up(examples, 30, seed=0, learning_rate=3e-2, context=CONTEXT)
    assert end < start * 0.8


def test_missing_model_says_how_to_fetch_it(tmp_path: Path) -> None:
    manifest = load_manifest(ENVIRONMENTS / "synthetic")
    for ref in (str(tmp_path / "no-such-model"), "no-such-org/no-such-model-xyz"):
        with pytest.raises(PolicyLoadError, match=r"huggingface-cli download"):
            build_policy(f"hf:{ref}", manifest, 0, parse_ideas=bracket_ideas)
    with pytest.raises(ValueError, match="parse_ideas"):
        build_policy(f"hf:{tmp_path}", manifest, 0)
    with pytest.raises(ValueError, match="unknown policy spec"):
        build_policy("gpt-17", manifest, 0)
