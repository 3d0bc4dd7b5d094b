"""A trusted knob-only candidate is checked without a workspace (candidates._checked_in_memory)
and comes out as the workspace path makes it: the same files changed, patched-tree digest, diff
digest and pre-flight checks, equal to what a runner's Environment.materialize finds. Every
other patch, and any file whose text in memory might not be its bytes on disk, still goes
through a workspace; a patch that is not knob-only still gets its smoke run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment
from groundloop.execution.tree_digests import patched_tree_digest
from groundloop.implementer.candidates import (
    Candidate,
    ImplementerDeps,
    _checked_in_workspace,
    check_candidate,
    environment_sources,
)
from tests.paths import ENVIRONMENTS


@pytest.fixture
def synthetic() -> Environment:
    return Environment.load("synthetic", ENVIRONMENTS)


def deps_in(tmp: Path, env: Environment) -> ImplementerDeps:
    return ImplementerDeps(
        search=lambda _: None,
        environment=lambda _: env,
        llm=lambda *_: None,  # type: ignore[arg-type, return-value]
        work_dir=tmp / "work",
        cache_dir=tmp / "cache",
    )


def knob_diff(sources: dict[str, str], *replacements: tuple[str, str]) -> str:
    text = sources["config.py"]
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return make_diff({"config.py": sources["config.py"]}, {"config.py": text})


def facts(candidate: Candidate) -> tuple:
    checks = [(c.name, c.ok, c.detail) for c in candidate.report.checks]
    return candidate.diff, candidate.made, candidate.report.passed, checks


KNOB_PATCHES = {
    "one knob": [("LEARNING_RATE = 1e-3", "LEARNING_RATE = 0.02")],
    "every kind of knob": [
        ("MOMENTUM = 0.5", "MOMENTUM = 0.9"),
        ("WIDTH = 32", "WIDTH = 128"),
        ('SCHEDULE = "constant"', 'SCHEDULE = "cosine"'),
        ("USE_WARMUP = False", "USE_WARMUP = True"),
    ],
    "a knob and a unicode comment": [
        ("WIDTH = 32", "WIDTH = 64"),
        ("# Only makes", "# Réglage — only makes"),
    ],
}


@pytest.mark.parametrize("patch", sorted(KNOB_PATCHES))
def test_a_knob_only_candidate_needs_no_workspace_and_matches_the_workspace_path(
    synthetic, tmp_path, patch
):
    sources, deps = environment_sources(synthetic), deps_in(tmp_path, synthetic)
    diff = knob_diff(sources, *KNOB_PATCHES[patch])
    verdict = check_candidate(synthetic, diff, sources, deps, 0)
    assert verdict.passed and isinstance(verdict.result, Candidate), verdict
    assert not deps.work_dir.exists()  # no workspace was made
    smoke = verdict.result.report.checks[-1]
    assert smoke.name == "smoke" and smoke.detail.startswith("skipped: the patch only sets knobs")

    old_path = _checked_in_workspace(synthetic, verdict.result.diff, sources, deps, 0)
    assert facts(verdict.result) == facts(old_path)
    made = synthetic.materialize(tmp_path / "runner", verdict.result.diff)  # as a runner does
    assert (made.files_changed, made.patched_digest, made.diff_digest) == (
        verdict.result.made.files_changed,
        verdict.result.made.patched_digest,
        verdict.result.made.diff_digest,
    )
    assert made.files_changed == ["config.py"] and made.patched_digest != synthetic.digest()


def test_a_patch_that_is_not_knob_only_still_gets_its_smoke_run(synthetic, tmp_path):
    sources, deps = environment_sources(synthetic), deps_in(tmp_path, synthetic)
    slower = knob_diff(sources, ("SLEEP_SECONDS = 0.0", "SLEEP_SECONDS = 0.5"))  # not a knob
    verdict = check_candidate(synthetic, slower, sources, deps, 0)
    assert verdict.passed and isinstance(verdict.result, Candidate), verdict
    assert "passed in" in verdict.result.report.checks[-1].detail  # the smoke command ran
    assert deps.work_dir.is_dir() and not list(deps.work_dir.iterdir())  # and was cleaned up

    crashing = knob_diff(sources, ("WIDTH = 32", "WIDTH = 32\nraise SystemExit(3)"))
    verdict = check_candidate(synthetic, crashing, sources, deps, 0)
    assert not verdict.passed and verdict.stage == "preflight"
    assert "smoke" in verdict.error and "exit code 3" in verdict.error


def test_an_out_of_range_knob_is_not_trusted(synthetic, tmp_path):
    sources, deps = environment_sources(synthetic), deps_in(tmp_path, synthetic)
    too_fast = knob_diff(sources, ("LEARNING_RATE = 1e-3", "LEARNING_RATE = 0.5"))
    verdict = check_candidate(synthetic, too_fast, sources, deps, 0)
    assert verdict.passed and isinstance(verdict.result, Candidate)
    assert "passed in" in verdict.result.report.checks[-1].detail  # smoked, not skipped

    no_such_choice = knob_diff(sources, ('SCHEDULE = "constant"', 'SCHEDULE = "step"'))
    verdict = check_candidate(synthetic, no_such_choice, sources, deps, 0)
    assert not verdict.passed and verdict.stage == "preflight"
    assert "smoke" in verdict.error and "KeyError" in verdict.error


def test_a_knob_patch_that_does_not_compile_fails_as_in_a_workspace(synthetic, tmp_path):
    # Parses but does not compile: the original file already has the error; both paths say so.
    copy = tmp_path / "envs" / "synthetic"
    shutil.copytree(ENVIRONMENTS / "synthetic", copy)
    config = copy / "config.py"
    config.write_text(config.read_text() + "\nnonlocal SLEEP_SECONDS\n")
    env = Environment.load(copy)
    sources, deps = environment_sources(env), deps_in(tmp_path, env)
    verdict = check_candidate(
        env, knob_diff(sources, ("WIDTH = 32", "WIDTH = 64")), sources, deps, 0
    )
    assert not verdict.passed and verdict.stage == "preflight" and "compile" in verdict.error
    assert not deps.work_dir.exists()
    assert isinstance(verdict.result, Candidate)
    old_path = _checked_in_workspace(env, verdict.result.diff, sources, deps, 0)
    assert facts(verdict.result) == facts(old_path)


def test_texts_that_may_differ_from_the_files_go_through_a_workspace(synthetic, tmp_path):
    # CRLF line endings: the implementer's texts (read with newlines translated) are not the
    # file's bytes.
    copy = tmp_path / "envs" / "synthetic"
    shutil.copytree(ENVIRONMENTS / "synthetic", copy)
    config = copy / "config.py"
    config.write_bytes(config.read_bytes().replace(b"\n", b"\r\n"))
    crlf = Environment.load(copy)
    # Texts held from before the file changed: the diff still applies to the file as it is now.
    stale = environment_sources(synthetic)
    old_line = "The synthetic environment's recipe"  # far from WIDTH
    stale["config.py"] = stale["config.py"].replace(old_line, "An older recipe")
    for env, sources in ((crlf, environment_sources(crlf)), (synthetic, stale)):
        deps = deps_in(tmp_path / env.root.parent.name, env)
        diff = knob_diff(sources, ("WIDTH = 32", "WIDTH = 64"))
        verdict = check_candidate(env, diff, sources, deps, 0)
        assert deps.work_dir.is_dir()  # a workspace was made
        assert verdict.passed and isinstance(verdict.result, Candidate), verdict
        made = env.materialize(tmp_path / "runner" / env.root.parent.name, diff)
        assert verdict.result.made.patched_digest == made.patched_digest
        assert made.patched_digest != patched_tree_digest(
            env.root, {"config.py": sources["config.py"].replace("WIDTH = 32", "WIDTH = 64")}
        )  # what memory alone would say
