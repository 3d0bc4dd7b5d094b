"""The synthetic environment: a closed-form score of its knobs, deterministic per seed.

Its protected run.py is run as the runner runs it (a subprocess in a fresh workspace with the
GROUNDLOOP_* variables); the expected scores are the formula restated here.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from groundloop.execution.environment import Environment
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT / "environments" / "synthetic"
DEFAULTS = {
    "LEARNING_RATE": 1e-3,
    "MOMENTUM": 0.5,
    "WIDTH": 32,
    "SCHEDULE": "constant",
    "USE_WARMUP": False,
}
OPTIMUM = {
    "LEARNING_RATE": 1e-2,
    "MOMENTUM": 0.9,
    "WIDTH": 128,
    "SCHEDULE": "cosine",
    "USE_WARMUP": True,
}


def expected(knobs: dict) -> float:
    """The documented formula, without the noise (|noise| <= 0.001)."""
    return (
        1.0
        - 0.1 * (math.log10(knobs["LEARNING_RATE"]) + 2) ** 2
        - 0.5 * (knobs["MOMENTUM"] - 0.9) ** 2
        - 0.05 * (math.log2(knobs["WIDTH"]) - 7) ** 2
        + {"constant": 0.0, "linear": 0.02, "cosine": 0.05}[knobs["SCHEDULE"]]
        + (0.01 if knobs["USE_WARMUP"] else 0.0)
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "ws"
    Environment.load(ROOT).materialize(path)
    return path


def run_synthetic(
    workspace: Path, seed: int = 0, split: str = "val", smoke: bool = False, **knobs: object
) -> float:
    config = workspace / "config.py"
    original = (ROOT / "config.py").read_text()
    text = original + "".join(f"{name} = {value!r}\n" for name, value in knobs.items())
    config.write_text(text)
    metrics = workspace.parent / f"metrics-{seed}-{split}.json"
    env = {
        **os.environ,
        "GROUNDLOOP_SEED": str(seed),
        "GROUNDLOOP_SPLIT": split,
        "GROUNDLOOP_METRICS_OUT": str(metrics),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if smoke:
        env["GROUNDLOOP_SMOKE"] = "1"
    subprocess.run(
        [sys.executable, "run.py"],
        cwd=workspace,
        env=env,
        check=True,
        capture_output=True,
        timeout=30,
    )
    data = json.loads(metrics.read_text())
    metrics.unlink()
    assert list(data) == ["score"]
    return data["score"]


def test_baseline_runs_fast_and_scores_the_formula(workspace):
    started = time.monotonic()
    score = run_synthetic(workspace)
    assert time.monotonic() - started < 1.0
    assert score == pytest.approx(expected(DEFAULTS), abs=1e-3)
    assert score == pytest.approx(0.62, abs=2e-3)


def test_same_seed_same_score_and_noise_is_tiny(workspace):
    scores = {seed: run_synthetic(workspace, seed) for seed in (0, 1, 2)}
    assert run_synthetic(workspace, 1) == scores[1]
    assert len(set(scores.values())) == 3, "different seeds give different noise"
    assert max(scores.values()) - min(scores.values()) <= 2e-3
    assert run_synthetic(workspace, 1, split="test") != scores[1]


@pytest.mark.parametrize(
    "name,value",
    [
        ("LEARNING_RATE", 1e-2),
        ("LEARNING_RATE", 1e-1),
        ("LEARNING_RATE", 1e-4),
        ("MOMENTUM", 0.9),
        ("MOMENTUM", 0.0),
        ("WIDTH", 128),
        ("WIDTH", 8),
        ("SCHEDULE", "cosine"),
        ("SCHEDULE", "linear"),
        ("USE_WARMUP", True),
    ],
)
def test_each_knob_moves_the_score_as_the_formula_says(workspace, name, value):
    base = run_synthetic(workspace, seed=5)
    moved = run_synthetic(workspace, seed=5, **{name: value})
    # same seed, same noise: the difference is exactly the formula's
    assert moved - base == pytest.approx(
        expected({**DEFAULTS, name: value}) - expected(DEFAULTS), abs=1e-9
    )


def test_the_optimum_is_unique_inside_the_ranges_and_below_the_hack_ceiling(workspace):
    manifest = Environment.load(ROOT).manifest
    best = run_synthetic(workspace, **OPTIMUM)
    assert best == pytest.approx(1.06, abs=1e-3)
    assert best < manifest.metric.hack_ceiling
    for knob in manifest.knobs:
        if knob.type in ("float", "int"):
            assert knob.low < OPTIMUM[knob.name] < knob.high
            for nudge in (0.9, 1.1):  # any step away from the optimum scores lower
                off = {**OPTIMUM, knob.name: OPTIMUM[knob.name] * nudge}
                assert expected(off) < expected(OPTIMUM)
        elif knob.type == "choice":
            assert OPTIMUM[knob.name] in knob.choices


def test_manifest_defaults_match_config_and_are_not_the_optimum():
    manifest = Environment.load(ROOT).manifest
    tree = ast.parse((ROOT / "config.py").read_text())
    constants = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
    }
    assert {k.name: k.default for k in manifest.knobs} == DEFAULTS
    assert {k: constants[k] for k in DEFAULTS} == DEFAULTS
    assert constants["SLEEP_SECONDS"] == 0.0 and DEFAULTS != OPTIMUM
    assert manifest.metric.direction == "maximize" and manifest.metric.reward == "x"


def test_sleep_stands_in_for_training_time_and_smoke_skips_it(workspace):
    started = time.monotonic()
    slow = run_synthetic(workspace, SLEEP_SECONDS=0.3)
    assert time.monotonic() - started >= 0.3
    assert slow == run_synthetic(workspace)
    started = time.monotonic()
    run_synthetic(workspace, smoke=True, SLEEP_SECONDS=30.0)
    assert time.monotonic() - started < 5
