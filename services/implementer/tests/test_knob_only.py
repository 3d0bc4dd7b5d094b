"""Pre-flight only what needs it: a patch that sets nothing but declared knobs to values in
their ranges skips the smoke run where the manifest trusts its knobs; any other change, and
any environment that does not say so, still gets its smoke run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from groundloop.execution.environment import Environment
from groundloop.implementer.knob_only import knob_only_change
from groundloop.implementer.preflight import run_preflight
from groundloop.manifest import ManifestError, load_manifest
from tests.paths import ENVIRONMENTS, smoked_synthetic


@pytest.fixture
def synthetic() -> Environment:
    return Environment.load("synthetic", ENVIRONMENTS)


def config(env: Environment) -> str:
    return (env.root / "config.py").read_text()


def changed(env: Environment, new_config: str) -> dict[str, str] | None:
    return knob_only_change(env.manifest, {"config.py": config(env)}, {"config.py": new_config})


def test_knob_values_in_range_are_a_knob_only_change(synthetic):
    text = config(synthetic)
    after = (
        text.replace("LEARNING_RATE = 1e-3", "LEARNING_RATE = 0.01")
        .replace('SCHEDULE = "constant"', "SCHEDULE = 'cosine'")
        .replace("USE_WARMUP = False", "USE_WARMUP = True")
        .replace("# Only makes", "# a comment the model rewrote; only makes")
    )
    assert changed(synthetic, after) == {
        "LEARNING_RATE": "0.01",
        "SCHEDULE": '"cosine"',
        "USE_WARMUP": "True",
    }


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        ("LEARNING_RATE = 1e-3", "LEARNING_RATE = 0.5", "outside the range"),
        ("LEARNING_RATE = 1e-3", 'LEARNING_RATE = "0.01"', "a string for a float"),
        ("LEARNING_RATE = 1e-3", "LEARNING_RATE = True", "a bool for a float"),
        ("WIDTH = 32", "WIDTH = 64.5", "a fraction for an int"),
        ("WIDTH = 32", "WIDTH = 2 ** 6", "an expression, not a literal"),
        ('SCHEDULE = "constant"', 'SCHEDULE = "step"', "not one of the choices"),
        ("SLEEP_SECONDS = 0.0", "SLEEP_SECONDS = 1000.0", "a constant that is no knob"),
        ("WIDTH = 32", "WIDTH = 64\nWIDTH = 128", "a knob set twice"),
        ("WIDTH = 32", "WIDTH = 64\nimport os", "code beside the knob"),
        ("USE_WARMUP = False", "USE_WARMUP = False\nMOMENTUM = MOMENTUM * 2", "code using one"),
        ("WIDTH = 32", "WIDTH = (", "a file that does not parse"),
    ],
)
def test_anything_else_is_not(synthetic, old, new, why):
    text = config(synthetic)
    assert old in text
    assert changed(synthetic, text.replace(old, new)) is None, why


def test_new_deleted_and_unchanged_files_are_not_knob_only(synthetic):
    m, text = synthetic.manifest, config(synthetic)
    tuned = text.replace("WIDTH = 32", "WIDTH = 64")
    assert (
        knob_only_change(m, {"config.py": text}, {"config.py": tuned, "extra.py": "x = 1"}) is None
    )
    assert knob_only_change(m, {"config.py": text}, {}) is None
    assert knob_only_change(m, {"config.py": text}, {"config.py": text}) is None


def test_trusted_knobs_need_knobs(tmp_path):
    source = (ENVIRONMENTS / "synthetic" / "manifest.toml").read_text()
    bare = source[: source.index("[[knobs]]")]
    path = tmp_path / "manifest.toml"
    path.write_text(bare)
    with pytest.raises(ManifestError, match="trusted_knobs = true needs"):
        load_manifest(path)


def preflight(env: Environment, tmp_path: Path, new_config: str):
    workspace = tmp_path / "workspace"
    shutil.copytree(env.root, workspace)
    (workspace / "config.py").write_text(new_config)
    return run_preflight(
        env,
        workspace,
        ["config.py"],
        scratch=tmp_path / "scratch",
        cache_dir=tmp_path / "cache",
        seed=0,
    )


def test_a_trusted_knob_patch_skips_the_smoke_run_and_says_so(synthetic, tmp_path):
    report = preflight(
        synthetic, tmp_path, config(synthetic).replace("MOMENTUM = 0.5", "MOMENTUM = 0.9")
    )
    smoke = report.checks[-1]
    assert report.passed and smoke.name == "smoke" and smoke.seconds == 0.0
    assert "skipped" in smoke.detail and "MOMENTUM=0.9" in smoke.detail
    assert not (tmp_path / "scratch" / "smoke.log").exists()  # nothing ran


def test_any_other_patch_still_runs_the_smoke_and_fails_on_it(synthetic, tmp_path):
    broken = config(synthetic).replace("WIDTH = 32", "WIDTH = 32\nraise SystemExit(3)")
    report = preflight(synthetic, tmp_path, broken)
    assert not report.passed and report.checks[-1].name == "smoke"
    assert "exit code 3" in report.checks[-1].detail


def test_an_untrusting_manifest_smokes_knob_patches(tmp_path):
    env = Environment.load("synthetic", smoked_synthetic(tmp_path))
    report = preflight(env, tmp_path, config(env).replace("MOMENTUM = 0.5", "MOMENTUM = 0.9"))
    assert report.passed and "passed in" in report.checks[-1].detail
    assert (tmp_path / "scratch" / "smoke.log").exists()
