"""nanogpt's evaluation runs editable model code in a worker that cannot read the split.

The protected evaluate.py imports train.py only in its model worker (model_worker.py),
started under a Landlock ruleset that denies the val/test shards (data.unreadable_paths())
before the evaluator reads the split, and the evaluator is non-dumpable, so the worker cannot
read the split from its memory either. A train.py whose import-time code tries both records
what it got. Smoke mode scores a split drawn from a public seed, so tiny fake shards in the
speedrun's format stand in for the real ones the worker must not read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment, execute
from tests.paths import REPO_ROOT

ENV = Environment.load("nanogpt", REPO_ROOT / "environments")
HEADER = "import harness\n"

# Runs when the evaluation imports train.py (training runs it as __main__): read the val
# shard, and the evaluating process's memory, and write down what happened.
SNOOP = """
if __name__ != "__main__":
    import json as _json
    import os as _os

    _seen = {}
    for _what, _path in (
        ("val_shard", _os.environ["GROUNDLOOP_CACHE_DIR"] + "/fineweb10B/fineweb_val_000000.bin"),
        ("evaluator_memory", f"/proc/{_os.getppid()}/mem"),
    ):
        try:
            with open(_path, "rb") as _file:
                _file.seek(4096 if _what == "evaluator_memory" else 0)
                _file.read(1024)
            _seen[_what] = "read"
        except OSError as _exc:
            _seen[_what] = type(_exc).__name__
    _os.makedirs("out", exist_ok=True)
    with open("out/snooped.json", "w") as _file:
        _json.dump(_seen, _file)
"""


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """The speedrun's shard format (nanogpt/data.py): 256 int32 header, then uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, len(tokens))
    path.write_bytes(header.tobytes() + tokens.astype(np.uint16).tobytes())


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """In the runner's cache dir for the environment, where runs look for them (the sandbox
    shows a run its cache, not the rest of the host's /tmp)."""
    folder = tmp_path / "cache" / "fineweb10B"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_shard(folder / "fineweb_val_000000.bin", rng.integers(0, 256, 4096))
    write_shard(folder / "fineweb_train_000001.bin", rng.integers(0, 256, 4096))
    return folder


def test_model_code_imported_by_the_evaluation_cannot_read_the_split(tmp_path, shards) -> None:
    source = ENV.editable_sources()["train.py"]
    assert source.count(HEADER) == 1, "the baseline train.py changed; update this test"
    snooping = source.replace(HEADER, HEADER + SNOOP)
    workspace = tmp_path / "ws"
    ENV.materialize(workspace, make_diff({"train.py": source}, {"train.py": snooping}))
    result = execute(
        ENV,
        workspace,
        seed=0,
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        smoke=True,
    )
    assert result.outcome.status == "succeeded", result.outcome.reason
    assert result.evaluate is not None
    assert "shard Landlock enforced" in result.evaluate.output_tail
    seen = json.loads((workspace / "out/snooped.json").read_text())
    assert seen == {"val_shard": "PermissionError", "evaluator_memory": "PermissionError"}
    # and it gained nothing: an untrained toy model on uniform tokens scores about ln 256
    assert result.outcome.score == pytest.approx(math.log(256), abs=0.3)


def test_unreadable_paths_are_the_val_shards_wherever_a_run_looks(
    tmp_path, shards, monkeypatch
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_data", ENV.root / "data.py")
    assert spec is not None and spec.loader is not None
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    monkeypatch.setenv("GROUNDLOOP_CACHE_DIR", str(tmp_path / "cache"))
    cached = shards
    shards = tmp_path / "own"
    shards.mkdir()
    write_shard(shards / "fineweb_val_000000.bin", np.arange(10))
    monkeypatch.setenv("NANOGPT_DATA_DIR", str(shards))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.unreadable_paths() == sorted(
        [
            (shards / "fineweb_val_000000.bin").resolve(),
            (cached / "fineweb_val_000000.bin").resolve(),
        ]
    )  # never the train shards: they are training's to read
    monkeypatch.setenv("NANOGPT_DATA_DIR", str(tmp_path / "missing"))
    monkeypatch.delenv("GROUNDLOOP_CACHE_DIR")
    assert data.unreadable_paths() == []  # no shards (smoke on a bare box): nothing to deny
