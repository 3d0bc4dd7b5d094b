"""tinygrpo end to end through the run protocol (groundloop.execution.environment.execute).

The real prepare step (the supervised warm-up that builds the base policy, cached by digest),
then real GRPO runs in the sandbox scored by the protected greedy-decoding evaluation: smoke
runs (2 GRPO steps, 64 validation problems) and one short full run (a STEPS knob edit, the
full 1,000-problem evaluation). Same seed, same metric; protected files cannot be patched;
knob edits reach training; the splits never overlap.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment, PatchRejected, execute
from groundloop.implementer.knob_edit import knob_sources
from tests.paths import REPO_ROOT

pytestmark = pytest.mark.slow

ENV = Environment.load("tinygrpo", REPO_ROOT / "environments")


def run(tmp: Path, cache: Path, knobs: dict | None = None, seed: int = 0, smoke: bool = True):
    diff = None
    if knobs:
        after = knob_sources(ENV.manifest, ENV.editable_sources(), knobs)
        diff = make_diff({rel: (ENV.root / rel).read_text() for rel in after}, after)
    made = ENV.materialize(tmp / "ws", diff)
    return execute(ENV, made.path, seed=seed, run_dir=tmp / "run", cache_dir=cache, smoke=smoke)


@pytest.fixture(scope="module")
def env_modules(monkeypatch_module):
    """The protected task and policy modules, imported in-process from the environment."""
    monkeypatch_module.syspath_prepend(str(ENV.root))
    modules = {}
    for name in ("task", "policy"):
        spec = importlib.util.spec_from_file_location(name, ENV.root / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        monkeypatch_module.setitem(sys.modules, name, modules[name])
        spec.loader.exec_module(modules[name])
    return modules


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tinygrpo-cache")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache):
    return run(tmp_path_factory.mktemp("baseline"), cache)


def test_baseline_smoke_run_writes_accuracy_through_the_protected_evaluation(baseline):
    outcome = baseline.outcome
    assert outcome.status == "succeeded", outcome.reason
    assert 0.0 <= outcome.score <= 1.0 and outcome.reward == outcome.score
    assert outcome.metrics["problems"] == 64
    assert outcome.metrics["correct"] == round(outcome.score * 64)
    assert (
        math.isfinite(outcome.metrics["answer_logprob"]) and outcome.metrics["answer_logprob"] < 0
    )


def test_prepare_builds_a_base_policy_with_room_both_ways(
    baseline, cache, env_modules, monkeypatch
):
    policy, task = env_modules["policy"], env_modules["task"]
    monkeypatch.setenv("GROUNDLOOP_CACHE_DIR", str(cache))
    base_path = policy.base_checkpoint_path()
    assert base_path.is_file(), f"prepare left {sorted(p.name for p in cache.iterdir())}"
    stamp = base_path.stat().st_mtime_ns
    ENV.prepare(cache)  # cached: the same digest builds nothing
    assert base_path.stat().st_mtime_ns == stamp
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as evaluate.py does
    try:
        model = policy.load_policy(base_path).eval()
        problems = task.eval_problems("val")
        completions = policy.greedy_decode(model, task.encode_prompts(problems))
    finally:
        torch.set_num_threads(threads)
    accuracy = sum(task.reward(p, c) for p, c in zip(problems, completions, strict=True)) / len(
        problems
    )
    assert 0.15 <= accuracy <= 0.6, f"base accuracy {accuracy} leaves no room"


def test_same_seed_same_metric(baseline, tmp_path, cache):
    again = run(tmp_path, cache)
    assert again.outcome.metrics == baseline.outcome.metrics


def test_knob_edits_reach_training(baseline, tmp_path, cache):
    result = run(tmp_path, cache, {"GROUP_SIZE": 2, "LEARNING_RATE": 3e-3})
    assert result.outcome.status == "succeeded", result.outcome.reason
    assert "rollouts/step 32" in result.train.output_tail  # 16 prompts x 2
    assert result.outcome.metrics["answer_logprob"] != baseline.outcome.metrics["answer_logprob"]


def test_a_short_full_run_scores_the_whole_validation_split(tmp_path, cache):
    result = run(tmp_path, cache, {"STEPS": 50}, smoke=False)
    assert result.outcome.status == "succeeded", result.outcome.reason
    assert result.outcome.metrics["problems"] == 1000
    assert "step   49/50" in result.train.output_tail


def test_patches_to_protected_files_are_rejected(tmp_path):
    cases = {
        "task.py": ("return 1.0 if completion_text", "return 1.0 if True or completion_text"),
        "evaluate.py": ('CHECKPOINT = Path("out/policy.pt")', 'CHECKPOINT = Path("out/other.pt")'),
        "prepare.py": ("TARGET_ACCURACY = 0.3", "TARGET_ACCURACY = 0.99"),
        "manifest.toml": ("wall_seconds = 90", "wall_seconds = 9000"),
    }
    for name, (old, new) in cases.items():
        text = (ENV.root / name).read_text()
        assert old in text, f"{name} changed; update this test"
        with pytest.raises(PatchRejected, match=f"{name} is protected"):
            ENV.materialize(
                tmp_path / name, make_diff({name: text}, {name: text.replace(old, new)})
            )


def test_splits_are_disjoint_and_training_never_sees_evaluation_problems(env_modules):
    task = env_modules["task"]
    val, test = task.eval_problems("val"), task.eval_problems("test")
    assert len(set(val)) == len(val) == 1000 and not set(val) & set(test)
    assert all(task.split_of(*p) == "val" for p in val)
    assert all(task.split_of(*p) == "test" for p in test)
    train = task.sample_train_problems(5000, torch.Generator().manual_seed(0))
    assert not set(train) & (set(val) | set(test))
    assert task.reward((45, 123), task.encode("861.")) == 1.0
    assert task.reward((45, 123), task.encode("168.")) == 0.0
    assert task.reward((45, 123), task.encode("861")) == 0.0, "the end mark is part of the answer"


def test_every_knob_is_a_constant_of_its_file_with_its_default():
    for knob in ENV.manifest.knobs:
        assert knob.file in ENV.manifest.editable, knob.name
        tree = ast.parse((ENV.root / knob.file).read_text())
        constants = {
            node.targets[0].id: ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id.isupper()
        }
        assert constants[knob.name] == knob.default, knob.name
