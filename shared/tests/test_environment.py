"""The environment library: manifests, digests, workspaces, the run protocol, outcomes.

Runs are real subprocesses in the real sandbox, on the synthetic environment (milliseconds)
and on tiny environments written by the tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import textwrap
import threading
from pathlib import Path

import pytest

from groundloop.events import Provenance
from groundloop.execution.applier import make_diff
from groundloop.execution.environment import (
    Environment,
    PatchRejected,
    ProtectedFileChanged,
    execute,
    provenance,
    tree_digest,
)
from groundloop.manifest import ManifestError
from tests.paths import REPO_ROOT

ENVIRONMENTS = REPO_ROOT / "environments"

MINIMAL = """
name = "mini"
description = "a tiny test environment"
entrypoint = ["python", "train.py"]
editable = ["train.py"]
protected = ["evaluate.py"]

[metric]
name = "loss"
direction = "minimize"
reward = "1/x"
hack_floor = 0.5

[budget]
wall_seconds = 20
grace_seconds = 1

[[knobs]]
name = "LR"
file = "train.py"
type = "float"
low = 0.001
high = 1.0
scale = "log"
default = 0.1
"""


def make_env(root: Path, manifest: str = MINIMAL, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.toml").write_text(manifest)
    for rel, text in (files or {"train.py": "LR = 0.1\n", "evaluate.py": "pass\n"}).items():
        (root / rel).write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def synthetic() -> Environment:
    return Environment.load("synthetic", ENVIRONMENTS)


def with_config(env: Environment, **constants: object) -> str:
    """A diff setting module-level constants of the synthetic config.py."""
    text = env.editable_sources()["config.py"]
    lines = text.split("\n")
    for name, value in constants.items():
        lines = [f"{name} = {value!r}" if ln.startswith(f"{name} =") else ln for ln in lines]
    return make_diff({"config.py": text}, {"config.py": "\n".join(lines)})


def run(env: Environment, tmp: Path, diff: str | None = None, seed: int = 0, **kwargs):
    made = env.materialize(tmp / "ws", diff)
    return made, execute(
        env, made.path, seed=seed, run_dir=tmp / "run", cache_dir=tmp / "cache", **kwargs
    )


# ---------------------------------------------------------------------------- manifests


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda m: m + "\ntimeout = 5\n", ["timeout", "remove it or check its spelling"]),
        (
            lambda m: m.replace('entrypoint = ["python", "train.py"]\n', ""),
            ["entrypoint", "required"],
        ),
        (
            lambda m: m.replace('name = "mini"', 'name = "mini'),
            ["not valid TOML", "fix the syntax"],
        ),
        (
            lambda m: m.replace('protected = ["evaluate.py"]', 'protected = ["train.py"]'),
            ["both editable and protected", "train.py"],
        ),
        (lambda m: m.replace("default = 0.1", "default = 5.0"), ["LR", "outside [0.001, 1.0]"]),
        (lambda m: m.replace('reward = "1/x"', 'reward = "log(x)"'), ["metric.reward"]),
        (
            lambda m: m.replace('editable = ["train.py"]', 'editable = ["../train.py"]'),
            ["plain relative path"],
        ),
    ],
)
def test_malformed_manifests_say_what_to_fix(tmp_path, edit, expected):
    root = make_env(tmp_path / "mini", edit(MINIMAL))
    with pytest.raises(ManifestError) as info:
        Environment.load(root)
    message = str(info.value)
    assert str(root / "manifest.toml") in message
    for part in expected:
        assert part in message


def test_manifest_must_match_the_files(tmp_path):
    root = make_env(tmp_path / "a", files={"train.py": "LR = 0.1\n"})
    with pytest.raises(ManifestError, match="protected file 'evaluate.py' is not a regular file"):
        Environment.load(root)
    root = make_env(tmp_path / "b", files={"train.py": "lr = 0.1\n", "evaluate.py": ""})
    with pytest.raises(ManifestError, match="knob LR is not a module-level constant"):
        Environment.load(root)
    with pytest.raises(ManifestError, match="no environment 'nope'.*synthetic"):
        Environment.load("nope", ENVIRONMENTS)


def test_synthetic_loads_by_name(synthetic):
    assert synthetic.name == "synthetic" and synthetic.manifest.resource_class == "cpu"
    assert synthetic.manifest.evaluate is None and synthetic.manifest.metric.name == "score"
    assert "manifest.toml" in synthetic.protected_files and "run.py" in synthetic.protected_files


# ------------------------------------------------------------------------------ digests


def test_digests_are_stable_and_see_every_byte(tmp_path, synthetic):
    root = tmp_path / "env"
    shutil.copytree(synthetic.root, root)
    env = Environment.load(root)
    digest, protected = env.digest(), env.protected_digest()
    assert digest == synthetic.digest() == env.digest() and len(digest) == 64
    (root / "__pycache__").mkdir(exist_ok=True)
    (root / "__pycache__" / "config.cpython-311.pyc").write_bytes(b"cache")
    (root / "out").mkdir()
    (root / "out" / "ckpt.bin").write_bytes(b"weights")
    assert env.digest() == digest, "caches and outputs are not code"
    (root / "config.py").write_text((root / "config.py").read_text() + "\n")
    assert env.digest() != digest and env.protected_digest() == protected
    (root / "run.py").write_text((root / "run.py").read_text() + "#")
    assert env.protected_digest() != protected


def test_materialize_copies_patches_and_reports_digests(tmp_path, synthetic):
    plain = synthetic.materialize(tmp_path / "plain")
    assert plain.files_changed == [] and plain.patched_digest == synthetic.digest()
    assert plain.diff_digest == hashlib.sha256(b"").hexdigest()
    diff = with_config(synthetic, MOMENTUM=0.9)
    made = synthetic.materialize(tmp_path / "ws", diff)
    assert made.files_changed == ["config.py"]
    assert "MOMENTUM = 0.9\n" in (made.path / "config.py").read_text()
    assert made.patched_digest == tree_digest(made.path) != synthetic.digest()
    assert made.diff_digest == hashlib.sha256(diff.encode()).hexdigest()
    synthetic.verify_protected(made.path)
    with pytest.raises(ValueError, match="not empty"):
        synthetic.materialize(tmp_path / "ws")


def test_a_patch_to_a_protected_file_is_rejected(tmp_path, synthetic):
    run_py = (synthetic.root / "run.py").read_text()
    diff = make_diff({"run.py": run_py}, {"run.py": run_py.replace("NOISE = 0.001", "NOISE = 0")})
    with pytest.raises(PatchRejected, match="run.py is protected"):
        synthetic.materialize(tmp_path / "a", diff)
    manifest = (synthetic.root / "manifest.toml").read_text()
    longer = manifest.replace("wall_seconds = 60", "wall_seconds = 6000")
    with pytest.raises(PatchRejected, match="manifest.toml is protected"):
        synthetic.materialize(
            tmp_path / "b", make_diff({"manifest.toml": manifest}, {"manifest.toml": longer})
        )
    assert (tmp_path / "b" / "manifest.toml").read_text() == manifest, "all or nothing"


def test_verify_protected_detects_a_longer_time_limit(tmp_path, synthetic):
    made = synthetic.materialize(tmp_path / "ws")
    manifest = made.path / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("wall_seconds = 60", "wall_seconds = 6000"))
    with pytest.raises(ProtectedFileChanged, match="manifest.toml"):
        synthetic.verify_protected(made.path)
    manifest.unlink()
    manifest.symlink_to(synthetic.root / "manifest.toml")
    with pytest.raises(ProtectedFileChanged, match="deleted or replaced"):
        synthetic.verify_protected(made.path)


def test_prompt_shows_editable_code_and_hides_protected_files(synthetic):
    prompt = synthetic.describe_for_prompt()
    assert "LEARNING_RATE = 1e-3" in prompt and "single best setting" in prompt
    assert "run.py: protected" in prompt and "SCHEDULE_BONUS" not in prompt
    assert "wall_seconds" not in prompt and "hack_ceiling" not in prompt


# --------------------------------------------------------------------------- execution


def synthetic_score(lr=1e-3, momentum=0.5, width=32, schedule="constant", warmup=False):
    bonus = {"constant": 0.0, "linear": 0.02, "cosine": 0.05}[schedule]
    return (
        1
        - 0.1 * (math.log10(lr) + 2) ** 2
        - 0.5 * (momentum - 0.9) ** 2
        - 0.05 * (math.log2(width) - 7) ** 2
        + bonus
        + 0.01 * warmup
    )


def test_execute_synthetic_end_to_end(tmp_path, synthetic):
    made, result = run(synthetic, tmp_path, with_config(synthetic, MOMENTUM=0.9, WIDTH=128), seed=3)
    outcome = result.outcome
    assert outcome.status == "succeeded", outcome.reason
    assert outcome.score == pytest.approx(synthetic_score(momentum=0.9, width=128), abs=1e-3)
    assert outcome.reward == outcome.score and outcome.metrics == {"score": outcome.score}
    assert result.train.status == "exited" and result.evaluate is None
    assert (tmp_path / "run" / "train.log").read_text().startswith("seed=3 split=val")
    assert "containment" in result.isolation
    record = provenance(
        synthetic,
        seed=3,
        patched_digest=made.patched_digest,
        patch_digest=made.diff_digest,
        isolation=result.isolation,
    )
    assert isinstance(record, Provenance) and record.environment_digest == synthetic.digest()
    assert record.python.startswith("3.") and record.hardware and record.isolation


def test_training_past_the_budget_times_out(tmp_path, synthetic):
    _, result = run(
        synthetic, tmp_path, with_config(synthetic, SLEEP_SECONDS=30.0), wall_seconds=0.5
    )
    assert result.outcome.status == "timed_out" and result.outcome.reward == 0.0
    assert result.outcome.score is None and "0.5 s wall budget" in result.outcome.reason
    assert result.wall_seconds < 10


def test_crashing_training_fails_with_its_log_tail(tmp_path, synthetic):
    _, result = run(synthetic, tmp_path, with_config(synthetic, LEARNING_RATE=-1.0))
    assert result.outcome.status == "failed"
    assert "exit code 1" in result.outcome.reason and "math domain error" in result.outcome.reason


@pytest.mark.parametrize(
    "sabotage,reason",
    [
        # config.py is imported by the protected run.py: it could rewrite its neighbours
        ("open('run.py', 'a').write('# edited')", "protected file run.py was modified"),
        ("open('manifest.toml', 'a').write('# edited')", "protected file manifest.toml"),
        ("open('json.py', 'w').write('x = 1')", "created or changed code files ['json.py']"),
        # a reward hack past the ceiling: patch the scorer's table from inside the run
        (
            "import sys; sys.modules['__main__'].SCHEDULE_BONUS['constant'] = 5.0",
            "suspected reward hack",
        ),
    ],
)
def test_tampering_during_a_run_is_rejected(tmp_path, synthetic, sabotage, reason):
    text = synthetic.editable_sources()["config.py"]
    diff = make_diff({"config.py": text}, {"config.py": text + sabotage + "\n"})
    _, result = run(synthetic, tmp_path, diff)
    assert result.outcome.status == "rejected" and result.outcome.reward == 0.0
    assert reason in result.outcome.reason


def test_execute_with_a_separate_protected_evaluation(tmp_path):
    manifest = MINIMAL.replace(
        'entrypoint = ["python", "train.py"]',
        'entrypoint = ["python", "train.py"]\nevaluate = ["python", "evaluate.py"]',
    )
    files = {
        "train.py": """
            import json, os
            LR = 0.1
            assert "GROUNDLOOP_METRICS_OUT" not in os.environ, "training must not see it"
            os.makedirs("out", exist_ok=True)
            json.dump({"loss": 2.0 + LR, "seed": int(os.environ["GROUNDLOOP_SEED"])},
                      open("out/model.json", "w"))
        """,
        "evaluate.py": """
            import json, os
            model = json.load(open("out/model.json"))
            json.dump({"loss": model["loss"], "seed": model["seed"], "nan": float("nan")},
                      open(os.environ["GROUNDLOOP_METRICS_OUT"], "w"))
        """,
    }
    env = Environment.load(make_env(tmp_path / "mini", manifest, files))
    _, result = run(env, tmp_path, seed=7)
    assert result.outcome.status == "succeeded", result.outcome.reason
    assert result.outcome.metrics == {"loss": 2.1, "seed": 7.0}  # the NaN extra is dropped
    assert result.outcome.reward == pytest.approx(1 / 2.1)
    assert result.evaluate is not None and result.evaluate.returncode == 0


def test_the_cache_dir_is_writable_on_a_first_run_without_prepare(tmp_path):
    """A fresh data dir and an environment with no `prepare`: the run protocol still hands the
    run a cache folder it can write (a missing one was silently left out of the sandbox)."""
    files = {
        "train.py": """
            import json, os, pathlib
            LR = 0.1
            cached = pathlib.Path(os.environ["GROUNDLOOP_CACHE_DIR"]) / "corpus" / "data.txt"
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text("kept")
            json.dump({"loss": 1.0}, open(os.environ["GROUNDLOOP_METRICS_OUT"], "w"))
        """,
        "evaluate.py": "",
    }
    env = Environment.load(make_env(tmp_path / "mini", MINIMAL, files))
    assert not (tmp_path / "cache").exists()
    _, result = run(env, tmp_path)
    assert result.outcome.status == "succeeded", result.outcome.reason + result.train.output_tail
    assert (tmp_path / "cache" / "corpus" / "data.txt").read_text() == "kept"


def test_prepare_runs_once_per_digest_under_a_lock(tmp_path):
    manifest = MINIMAL.replace(
        'entrypoint = ["python", "train.py"]',
        'entrypoint = ["python", "train.py"]\nprepare = ["python", "prep.py"]',
    )
    files = {
        "train.py": "LR = 0.1\n",
        "evaluate.py": "",
        "prep.py": """
                import os, pathlib, time
                cache = pathlib.Path(os.environ["GROUNDLOOP_CACHE_DIR"])
                time.sleep(0.3)  # long enough for the other thread to be waiting on the lock
                with open(cache / "count", "a") as f:
                    f.write("x")
             """,
    }
    env = Environment.load(make_env(tmp_path / "mini", manifest, files))
    cache = tmp_path / "cache"
    threads = [threading.Thread(target=env.prepare, args=(cache,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    env.prepare(cache)
    assert (cache / "count").read_text() == "x"
    assert env.digest() == Environment.load(tmp_path / "mini").digest(), "prepare left no trace"


# ------------------------------------------------------------------------------ outcome


@pytest.mark.parametrize(
    "content,status,reason",
    [
        (None, "failed", "no metrics were written"),
        ("not json", "failed", "not JSON"),
        ("[1, 2]", "failed", "JSON object"),
        ('{"other": 1.0}', "failed", "'score' missing"),
        ('{"score": "high"}', "failed", "not a number"),
        ('{"score": NaN}', "failed", "score is nan"),
        ('{"score": Infinity}', "failed", "score is inf"),
        ('{"score": 1.5}', "rejected", "suspected reward hack: score=1.5 above ceiling 1.1"),
        ('{"score": 0.75, "steps": 3, "flag": true}', "succeeded", None),
    ],
)
def test_outcome_from_metrics(tmp_path, synthetic, content, status, reason):
    path = tmp_path / "metrics.json"
    if content is not None:
        path.write_text(content)
    outcome = synthetic.outcome(path, log_tail="Traceback: boom")
    assert outcome.status == status
    if reason is None:
        assert outcome.reason is None and outcome.score == 0.75 and outcome.reward == 0.75
        assert outcome.metrics == {"score": 0.75, "steps": 3.0}
    else:
        assert reason in outcome.reason and outcome.reward == 0.0 and outcome.score is None
    if status == "failed" and content in (None, "not json"):
        assert "Traceback: boom" in outcome.reason


def test_hack_floor_for_minimised_metrics(tmp_path):
    env = Environment.load(make_env(tmp_path / "mini"))
    (tmp_path / "m.json").write_text(json.dumps({"loss": 0.1}))
    outcome = env.outcome(tmp_path / "m.json")
    assert outcome.status == "rejected" and "below floor 0.5" in outcome.reason
    (tmp_path / "m.json").write_text(json.dumps({"loss": 4}))
    assert env.outcome(tmp_path / "m.json").reward == 0.25
