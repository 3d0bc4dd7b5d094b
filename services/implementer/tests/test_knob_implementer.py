"""The implementer's knob path: constants edited in place, checked against the manifest,
pre-flighted into a patch; large diffs go to the object store."""

from __future__ import annotations

from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.execution.environment import Environment
from groundloop.implementer.knob_edit import KnobEditError, knob_sources, set_constants
from groundloop.implementer.service import ImplementerDeps, handle
from groundloop.llm.client import ClientCache, LLMSettings
from tests.factories import idea_proposed as an_idea
from tests.factories import search_started_in


@pytest.fixture
def synthetic() -> Environment:
    return Environment.load("synthetic")


def started_for(
    env: Environment,
    implementer: ev.ImplementerSettings | None = None,
    search_id: str = "s1",
    prices: dict | None = None,
) -> ev.SearchStarted:
    return search_started_in(
        env,
        search_id,
        1,
        implementer=implementer,
        price_table=prices,
        generations=2,
        ideas_per_generation=4,
    )


def make_deps(
    tmp: Path, env: Environment, started: ev.SearchStarted, **overrides
) -> ImplementerDeps:
    """Deps for knob ideas, which never call a model."""
    values = dict(
        search=lambda _s: started,
        environment=lambda _n: env,
        llm=ClientCache(LLMSettings()),
        work_dir=tmp / "work",
        cache_dir=tmp / "cache",
    )
    return ImplementerDeps(**{**values, **overrides})


# ---------------------------------------------------------------------------- knob edits


def test_set_constants_edits_only_module_level_values():
    source = (
        '"""doc: X = 1"""\nX = 1  # keep this comment\nY: float = 2e-3\n'
        'def f():\n    X = 5\n    return X\nlabel = "X = 9"\nZ = (1,\n     2)\n'
    )
    out = set_constants(source, {"X": "7", "Y": "0.005", "Z": "3"}, "t.py")
    assert out == (
        '"""doc: X = 1"""\nX = 7  # keep this comment\nY: float = 0.005\n'
        'def f():\n    X = 5\n    return X\nlabel = "X = 9"\nZ = 3\n'
    )
    with pytest.raises(KnobEditError, match=r"no module-level assignment for \['W'\]"):
        set_constants(source, {"W": "1"}, "t.py")


def test_knob_values_are_checked_against_the_manifest(synthetic):
    m, sources = synthetic.manifest, synthetic.editable_sources()
    after = knob_sources(
        m, sources, {"LEARNING_RATE": 0.003, "WIDTH": 64.0, "SCHEDULE": "cosine", "USE_WARMUP": 1}
    )
    text = after["config.py"]
    assert "LEARNING_RATE = 0.003  # step size" in text and "WIDTH = 64  #" in text
    assert 'SCHEDULE = "cosine"' in text and "USE_WARMUP = True" in text
    for bad, reason in [
        ({"LEARNING_RATE": 5.0}, "outside its declared range"),
        ({"WIDTH": 33.5}, "not a whole number"),
        ({"SCHEDULE": "step"}, "not one of its choices"),
        ({"NOPE": 1}, "declares no knob 'NOPE'"),
        ({"MOMENTUM": "fast"}, "not a number"),
        ({}, "sets no knobs"),
    ]:
        with pytest.raises(KnobEditError, match=reason):
            knob_sources(m, sources, bad)


def test_knob_idea_becomes_a_preflighted_patch(tmp_path, synthetic):
    started = started_for(synthetic)
    [patch] = handle(
        an_idea(knobs={"LEARNING_RATE": 0.01, "MOMENTUM": 0.9}),
        make_deps(tmp_path, synthetic, started),
    )
    assert isinstance(patch, ev.PatchReady)
    assert patch.patch_id == ev.stable_id(patch.idea_id, "patch") and patch.files_changed == [
        "config.py"
    ]
    assert patch.implementer == ev.ImplementerInfo(kind="knobs") and patch.usage == ev.Usage()
    assert "+LEARNING_RATE = 0.01  # step size" in patch.diff and "+MOMENTUM = 0.9  #" in patch.diff
    assert [c.name for c in patch.preflight.checks] == ["compile", "protected", "smoke"]
    assert patch.preflight.passed and all(c.seconds >= 0 for c in patch.preflight.checks)
    assert (patch.resource_class, patch.seed, patch.environment_digest) == (
        "cpu",
        0,
        synthetic.digest(),
    )
    made = synthetic.materialize(tmp_path / "again", patch.diff)  # what a runner will do
    assert (made.patched_digest, made.diff_digest) == (patch.patched_digest, patch.diff_digest)
    assert not (tmp_path / "work").exists()  # a trusted knob patch needs no workspace


def test_baseline_idea_is_the_empty_diff(tmp_path, synthetic):
    [patch] = handle(
        an_idea(mode="baseline", knobs=None), make_deps(tmp_path, synthetic, started_for(synthetic))
    )
    assert patch.diff == "" and patch.files_changed == [] and patch.implementer.kind == "none"
    assert patch.preflight.passed


def test_bad_knobs_and_a_changed_environment_are_rejected(tmp_path, synthetic):
    started = started_for(synthetic)
    [failed] = handle(
        an_idea(knobs={"LEARNING_RATE": 99.0}), make_deps(tmp_path, synthetic, started)
    )
    assert (
        isinstance(failed, ev.PatchFailed)
        and failed.stage == "rejected"
        and "outside" in failed.last_error
    )
    stale = started.model_copy(update={"environment_digest": "0" * 64})
    [failed] = handle(an_idea(knobs={"LEARNING_RATE": 0.01}), make_deps(tmp_path, synthetic, stale))
    assert failed.stage == "rejected" and "changed since the search started" in failed.last_error


def test_large_diffs_go_to_the_object_store(tmp_path, synthetic):
    stored: dict[str, bytes] = {}

    def put(key: str, data: bytes) -> str:
        stored[key] = data
        return key

    deps = make_deps(
        tmp_path, synthetic, started_for(synthetic), put_artifact=put, inline_limit=100
    )
    [patch] = handle(an_idea(knobs={"WIDTH": 100}), deps)
    assert patch.diff is None and patch.diff_key == f"diffs/s1/{patch.patch_id}.diff"
    made = synthetic.materialize(tmp_path / "ws", stored[patch.diff_key].decode())
    assert made.diff_digest == patch.diff_digest and made.patched_digest == patch.patched_digest
