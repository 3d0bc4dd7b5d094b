"""The offline knobs-lm policy on the synthetic environment's manifest: the vocabulary, what a
completion means as an idea, the warm-up that makes step-0 samples valid, determinism and
exact checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from groundloop.manifest import Manifest, load_manifest
from groundloop.rl_trainer.knob_policy import KnobLMPolicy, knob_examples
from groundloop.rl_trainer.policy import Completion, GRPOSettings, SamplingContext, build_policy

ENVIRONMENTS = Path(__file__).resolve().parents[3] / "environments"
CONTEXT = SamplingContext(prompt_text="ignored by the knobs-lm", past=[])


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(ENVIRONMENTS / "synthetic")


@pytest.fixture(scope="module")
def warmed(manifest: Manifest) -> bytes:
    """A warmed-up policy's bytes (default examples and steps), shared by the tests."""
    policy = build_policy(None, manifest, seed=0)
    loss = policy.warm_up([], 300, seed=0)
    assert 0 < loss < 1.0  # per-token NLL; uniform over the vocabulary would be ~3.6
    return policy.state_bytes()


def load(manifest: Manifest, data: bytes, seed: int = 0) -> KnobLMPolicy:
    policy = build_policy("knobs-lm", manifest, seed=seed)
    assert isinstance(policy, KnobLMPolicy)
    policy.load_state_bytes(data)
    return policy


def completion(policy: KnobLMPolicy, text: str, end: bool = True) -> Completion:
    ids = policy.vocab.encode(text) + ([policy.vocab.eos_id] if end else [])
    return Completion(text=text, prompt_ids=[policy.vocab.bos_id], completion_ids=ids)


def parameters(policy: KnobLMPolicy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


def test_vocabulary_holds_names_grids_and_no_defaults(manifest: Manifest) -> None:
    policy = KnobLMPolicy(manifest, seed=0)
    grids = policy.vocab.grids
    assert set(grids) == {k.name for k in manifest.knobs}
    assert grids["LEARNING_RATE"][0] == 1e-4 and grids["LEARNING_RATE"][-1] == 0.1
    assert len(grids["LEARNING_RATE"]) == 8  # log-spaced; the default 1e-3 is not a grid point
    assert all(isinstance(v, int) for v in grids["WIDTH"]) and grids["WIDTH"][-1] == 512
    assert grids["SCHEDULE"] == ["linear", "cosine"]  # "constant" is the baseline
    assert grids["USE_WARMUP"] == [True]
    assert policy.kind == "knobs-lm" and policy.model_name == "groundloop-knob-lm"


def test_to_idea_reads_settings_and_names_every_problem(manifest: Manifest) -> None:
    policy = KnobLMPolicy(manifest, seed=0)
    draft = policy.to_idea(completion(policy, "LEARNING_RATE = 0.00518 ; WIDTH = 86"))
    assert draft.valid and draft.problem is None
    assert draft.title == "Set LEARNING_RATE to 0.00518 and WIDTH to 86"
    assert draft.knobs == {"LEARNING_RATE": 0.00518, "WIDTH": 86}
    assert "from 0.001 to 0.00518" in draft.text and "config.py" in draft.text
    three = policy.to_idea(
        completion(policy, "MOMENTUM = 0.99 ; SCHEDULE = cosine ; USE_WARMUP = True")
    )
    assert three.title == "Set MOMENTUM to 0.99, SCHEDULE to cosine and USE_WARMUP to True"
    assert three.knobs == {"MOMENTUM": 0.99, "SCHEDULE": "cosine", "USE_WARMUP": 1}
    refused = {
        "WIDTH = 86 ; WIDTH = 14": "set twice",
        "MOMENTUM = 512": "outside",
        "WIDTH = 0.1": "outside",
        "WIDTH = ; = 14": "not `NAME = value`",
        "SCHEDULE = 0.1": "not one of its choices",
        "USE_WARMUP = 0.1": "not True/False",
        "0.1 = WIDTH": "not a knob",
        "": "empty",
        "LEARNING_RATE = 0.1 ; MOMENTUM = 0.99 ; WIDTH = 14 ; SCHEDULE = linear ; USE_WARMUP = True": (
            "5 settings"
        ),
    }
    for text, problem in refused.items():
        draft = policy.to_idea(completion(policy, text))
        assert not draft.valid and draft.knobs is None, text
        assert problem in (draft.problem or ""), (text, draft.problem)
    unfinished = policy.to_idea(completion(policy, "WIDTH = 86", end=False))
    assert not unfinished.valid and "no end" in (unfinished.problem or "")


def test_knob_examples_are_valid_varied_and_seeded(manifest: Manifest) -> None:
    policy = KnobLMPolicy(manifest, seed=0)
    examples = knob_examples(manifest, 200, seed=1)
    assert examples == knob_examples(manifest, 200, seed=1) != knob_examples(manifest, 200, seed=2)
    drafts = [policy.to_idea(completion(policy, text)) for text, _ in examples]
    assert all(d.valid and d.knobs and 1 <= len(d.knobs) <= 3 for d in drafts)
    assert {len(d.knobs or {}) for d in drafts} == {1, 2, 3}
    assert len({text for text, _ in examples}) > 100  # one-knob ideas repeat: ~18 exist


def test_untrained_policy_writes_nonsense_and_warm_up_fixes_it(
    manifest: Manifest, warmed: bytes
) -> None:
    untrained = KnobLMPolicy(manifest, seed=0)
    raw = untrained.sample(CONTEXT, 100, seed=11)
    assert sum(untrained.to_idea(c).valid for c in raw) < 20  # decoding is not constrained

    policy = load(manifest, warmed)
    samples = policy.sample(CONTEXT, 200, seed=11)
    drafts = [policy.to_idea(c) for c in samples]
    valid = [d for d in drafts if d.valid]
    assert len(valid) / len(drafts) >= 0.9
    assert len({d.title for d in valid}) > 60  # diverse, not one memorised idea
    for draft in valid:
        assert draft.knobs and 1 <= len(draft.knobs) <= 4
        for name, value in draft.knobs.items():
            knob = manifest.knob(name)
            if knob.type in ("float", "int"):
                assert knob.low is not None and knob.high is not None
                assert knob.low <= float(value) <= knob.high, (name, value)
                assert knob.type == "float" or isinstance(value, int)
            elif knob.type == "choice":
                assert value in (knob.choices or []) and value != knob.default
            else:
                assert value == 1  # the only non-default bool setting, as events store bools


def test_sampling_is_deterministic_given_seed(manifest: Manifest, warmed: bytes) -> None:
    policy = load(manifest, warmed)
    first = policy.sample(CONTEXT, 16, seed=5)
    assert first == policy.sample(CONTEXT, 16, seed=5)
    assert first == load(manifest, warmed, seed=99).sample(CONTEXT, 16, seed=5)
    assert first != policy.sample(CONTEXT, 16, seed=6)
    # A near-greedy temperature repeats the model's likeliest ideas.
    warm = policy.sample(CONTEXT, 100, seed=5)
    cold = policy.sample(CONTEXT, 100, seed=5, settings=GRPOSettings(temperature=0.05))
    assert len({c.text for c in cold}) < 0.75 * len({c.text for c in warm})
    assert sum(policy.to_idea(c).valid for c in cold) >= sum(policy.to_idea(c).valid for c in warm)


def test_warm_up_takes_knob_settings_in_any_values(manifest: Manifest) -> None:
    """Warm-start examples from an earlier search carry exact values (bools as 0/1); they snap
    to the nearest grid words."""
    policy = KnobLMPolicy(manifest, seed=0)
    assert policy.vocab.example_words("LEARNING_RATE = 0.003 ; USE_WARMUP = 1") == (
        "LEARNING_RATE = 0.00193 ; USE_WARMUP = True"
    )
    assert policy.render({"WIDTH": 500, "SCHEDULE": "cosine"}) == "WIDTH = 512 ; SCHEDULE = cosine"
    with pytest.raises(ValueError, match="not a knob"):
        policy.vocab.example_words("DEPTH = 3")
    loss = policy.warm_up([("WIDTH = 500", 1.0), ("WIDTH = 9", 0.0)], 40, seed=0)
    assert loss < 0.2  # one example carries all the weight
    assert policy.to_idea(policy.sample(CONTEXT, 1, seed=0)[0]).knobs == {"WIDTH": 512}
    with pytest.raises(ValueError, match="weights must be >= 0"):
        policy.warm_up([("WIDTH = 500", -1.0)], 1, seed=0)


def test_checkpoint_resumes_bit_identically(manifest: Manifest, warmed: bytes) -> None:
    settings = GRPOSettings()
    original = load(manifest, warmed)
    group = original.sample(CONTEXT, 8, seed=21)
    rewards = [float(i % 3 == 0) for i in range(8)]
    original.update(group, rewards, settings, CONTEXT)  # AdamW now has moments to carry over
    saved = original.state_bytes()
    restored = load(manifest, saved, seed=123)  # another init: everything must come from bytes
    assert parameters(restored).keys() == parameters(original).keys()
    nxt = original.sample(CONTEXT, 8, seed=22)
    assert restored.sample(CONTEXT, 8, seed=22) == nxt
    for policy in (original, restored):
        policy.update(nxt, [1.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.0, 0.0], settings, CONTEXT)
    a, b = parameters(original), parameters(restored)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert original.state_bytes() == restored.state_bytes()


def test_checkpoint_of_another_environment_is_refused(manifest: Manifest, warmed: bytes) -> None:
    other = load_manifest(ENVIRONMENTS / "tinygpt")
    policy = KnobLMPolicy(other, seed=0)
    with pytest.raises(ValueError, match="same spec and environment"):
        policy.load_state_bytes(warmed)
    with pytest.raises(ValueError, match="not a policy checkpoint"):
        policy.load_state_bytes(b"not a checkpoint")


def test_environment_without_knobs_is_refused(manifest: Manifest) -> None:
    bare = manifest.model_copy(update={"knobs": []})
    with pytest.raises(ValueError, match="declares no knobs"):
        build_policy(None, bare, seed=0)
