"""tinygpt end to end through the run protocol (groundloop.execution.environment.execute).

Real workspaces, the real sandbox, real training and the protected evaluation, in smoke mode
(data.SMOKE_TOKENS training tokens, a 4 KiB validation slice) so each run takes seconds:
the baseline writes its val loss through evaluate.py; a seed gives the same number twice;
planted future-token leaks are rejected by the causality probe, and so is model code that
patches the evaluation; protected files, the budget and the time limit cannot be changed by a
patch or by training; knob edits reach the model.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import math
from pathlib import Path

import pytest

from groundloop.execution.applier import make_diff
from groundloop.execution.environment import (
    Environment,
    PatchRejected,
    ProtectedFileChanged,
    execute,
)
from groundloop.implementer.knob_edit import knob_sources
from tests.paths import REPO_ROOT

pytestmark = pytest.mark.slow

ENV = Environment.load("tinygpt", REPO_ROOT / "environments")
UNIFORM_LOSS = math.log(256)


def run(tmp: Path, cache: Path, diff: str | None = None, seed: int = 0):
    made = ENV.materialize(tmp / "ws", diff)
    return execute(ENV, made.path, seed=seed, run_dir=tmp / "run", cache_dir=cache, smoke=True)


def train_diff(old: str, new: str) -> str:
    source = ENV.editable_sources()["train.py"]
    assert source.count(old) == 1, f"the baseline train.py changed; {old!r} no longer matches once"
    return make_diff({"train.py": source}, {"train.py": source.replace(old, new)})


def load_data_module():
    spec = importlib.util.spec_from_file_location("tinygpt_data", ENV.root / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tinygpt-cache")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache):
    return run(tmp_path_factory.mktemp("baseline"), cache)


def test_baseline_writes_val_loss_through_the_protected_evaluation(baseline):
    outcome = baseline.outcome
    assert outcome.status == "succeeded", outcome.reason
    assert 1.0 < outcome.score < UNIFORM_LOSS - 1.0, "16 steps already beat a uniform guess"
    assert outcome.reward == pytest.approx(1.0 / outcome.score)
    metrics = outcome.metrics
    assert metrics["eval_tokens"] == 4096 and metrics["eval_window"] == 128
    assert metrics["causality_max_diff"] <= 1e-5
    assert baseline.evaluate is not None and "causality max diff" in baseline.evaluate.output_tail


def test_same_seed_same_metric_other_seed_differs(baseline, tmp_path, cache):
    again = run(tmp_path / "again", cache)
    assert again.outcome.metrics == baseline.outcome.metrics
    other = run(tmp_path / "other", cache, seed=1)
    assert other.outcome.status == "succeeded"
    assert other.outcome.score != baseline.outcome.score


@pytest.mark.parametrize(
    "old,new",
    [
        # Attention that sees the whole sequence.
        ("is_causal=True", "is_causal=False"),
        # Subtler: each position also gets the embedding of the next token.
        (
            "x = self.drop(self.wte(idx) + self.wpe(pos))",
            "x = self.drop(self.wte(idx) + self.wpe(pos) + self.wte(torch.roll(idx, -1, 1)))",
        ),
    ],
    ids=["full-attention", "next-token-embedding"],
)
def test_a_planted_future_token_leak_is_rejected(tmp_path, cache, old, new):
    result = run(tmp_path, cache, train_diff(old, new))
    assert result.outcome.status == "rejected"
    assert "future-token leak detected at position" in result.outcome.reason
    assert result.outcome.reward == 0.0 and result.evaluate.returncode == 3


def test_model_code_that_patches_the_evaluation_is_rejected(tmp_path, cache):
    # train.py is imported by evaluate.py (for GPT); halving the loss function at import time
    # would halve the score without touching a protected file.
    halve_loss = (
        "import torch.nn.functional as F\n\n"
        "_cross_entropy = F.cross_entropy\n"
        "F.cross_entropy = lambda *args, **kwargs: 0.5 * _cross_entropy(*args, **kwargs)\n"
    )
    result = run(tmp_path, cache, train_diff("import torch.nn.functional as F\n", halve_loss))
    assert result.outcome.status == "rejected"
    assert "F.cross_entropy" in result.outcome.reason and "altered" in result.outcome.reason


def test_patches_to_protected_files_or_the_time_limit_are_rejected(tmp_path):
    cases = {
        "data.py": ("TOKEN_BUDGET = 524_288", "TOKEN_BUDGET = 5_242_880"),
        "evaluate.py": ("PROBE_TOLERANCE = 1e-5", "PROBE_TOLERANCE = 1e9"),
        "manifest.toml": ("wall_seconds = 90", "wall_seconds = 9000"),
    }
    for name, (old, new) in cases.items():
        text = (ENV.root / name).read_text()
        assert old in text, f"{name} changed; update this test"
        with pytest.raises(PatchRejected, match=f"{name} is protected"):
            ENV.materialize(
                tmp_path / name, make_diff({name: text}, {name: text.replace(old, new)})
            )
    made = ENV.materialize(tmp_path / "edited")
    manifest = made.path / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("wall_seconds = 90", "wall_seconds = 9000"))
    with pytest.raises(ProtectedFileChanged, match="manifest.toml"):
        ENV.verify_protected(made.path)


def test_training_that_raises_its_own_token_budget_is_rejected(tmp_path, cache):
    # Rewrites the protected budget, then stops at once (the check needs no training).
    raise_budget = (
        '    Path("data.py").write_text(Path("data.py").read_text().replace('
        '"TOKEN_BUDGET = 524_288", "TOKEN_BUDGET = 10**9"))\n    return\n'
    )
    diff = train_diff("def main() -> None:\n", "def main() -> None:\n" + raise_budget)
    result = run(tmp_path, cache, diff)
    assert result.outcome.status == "rejected"
    assert "data.py" in result.outcome.reason and result.evaluate is None


def test_knob_edits_reach_the_model(baseline, tmp_path, cache):
    sources = knob_sources(ENV.manifest, ENV.editable_sources(), {"N_LAYER": 2, "BLOCK_SIZE": 64})
    result = run(tmp_path, cache, make_diff(ENV.editable_sources(), sources))
    assert result.outcome.status == "succeeded", result.outcome.reason
    assert result.outcome.metrics["eval_window"] == 64
    assert result.outcome.metrics["params"] < baseline.outcome.metrics["params"]
    assert "tokens/step 1024" in result.train.output_tail


def test_every_knob_is_a_train_constant_with_its_default():
    tree = ast.parse((ENV.root / "train.py").read_text())
    constants = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id.isupper()
    }
    for knob in ENV.manifest.knobs:
        assert constants[knob.name] == knob.default, knob.name
        if knob.type == "choice":
            assert knob.default in knob.choices


def test_corpus_is_deterministic_split_and_replaceable(tmp_path, monkeypatch, baseline):
    monkeypatch.setenv("GROUNDLOOP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GROUNDLOOP_TINYGPT_CORPUS", raising=False)
    data = load_data_module()
    built, provenance = data.load_corpus()  # built from the stdlib, then cached
    cached, again = data.load_corpus()
    assert built == cached and provenance == again
    assert provenance["corpus_sha256"] == hashlib.sha256(built).hexdigest()
    assert baseline.outcome.metrics["corpus_sha256_48"] == int(provenance["corpus_sha256"][:12], 16)
    splits = data.split_corpus(built)
    assert sum(len(s) for s in splits.values()) == len(built)
    assert 0.04 < len(splits["val"]) / len(built) < 0.06 and len(splits["val"]) > data.EVAL_TOKENS

    custom = tmp_path / "corpus.txt"
    custom.write_bytes(bytes(range(32, 127)) * 2000)
    monkeypatch.setenv("GROUNDLOOP_TINYGPT_CORPUS", str(custom))
    text, custom_provenance = data.load_corpus()
    assert text == custom.read_bytes() and custom_provenance["corpus_source"] == f"file:{custom}"


def test_the_token_budget_is_shared_and_can_only_shrink(monkeypatch):
    monkeypatch.setenv("GROUNDLOOP_TINYGPT_TOKENS", "10000")
    data = load_data_module()
    assert data.token_budget() == 10000
    first = list(data.train_batches(4, 64, seed=0))
    second = list(data.train_batches(4, 64, seed=0))
    assert len(first) == 10000 // 256 and second == [], "a second iterator buys no extra tokens"
    monkeypatch.setenv("GROUNDLOOP_TINYGPT_TOKENS", str(10**9))
    assert data.token_budget() == data.TOKEN_BUDGET
