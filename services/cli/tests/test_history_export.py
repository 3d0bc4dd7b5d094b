"""History: export a recorded search as the paper's trajectory rows, import them back as a
completed search that nothing acts on, and load the export with `datasets`."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from groundloop import events as ev
from groundloop.cli.history import HistoryError, export_paper, import_paper
from tests.history_support import SYNTHETIC, Recorder, record_source


@pytest.fixture(scope="module")
def recorded() -> Recorder:
    return record_source()


def test_export_then_import_then_export_round_trips(recorded: Recorder) -> None:
    rows = export_paper(recorded.search("src"))
    ideas = recorded.of(ev.IdeaProposed)
    assert len(rows) == len(ideas) == 12
    assert [r["epoch"] for r in rows] == sorted(r["epoch"] for r in rows)
    assert {tuple(r) for r in rows} == {
        ("ideator_model", "executor_model", "env", "epoch", "idea", "code_diff", "result")
    }
    failed = [r for r in rows if r["code_diff"] == ""]
    assert failed and all(r["result"] is None for r in failed)
    assert all(
        set(r["result"]) == {"score"} and isinstance(r["result"]["score"], float)
        for r in rows
        if r["code_diff"]
    )  # the released shape: {metric name: value}
    assert (
        rows[0]["ideator_model"] == rows[0]["executor_model"] == "knobs"
        and rows[0]["env"] == "synthetic"
    )
    assert rows[0]["idea"] == "Idea 0.0\n\n[Experiment] change knob 0 [End]"
    # mixed models, a patch whose run failed, and a result given as a bare integer
    patched = [i for i, r in enumerate(rows) if r["code_diff"]]
    rows[patched[0]] = {
        **rows[patched[0]],
        "ideator_model": "openai:gpt-x",
        "executor_model": "anthropic:claude-y",
    }
    rows[patched[1]] = {**rows[patched[1]], "result": None}
    rows[patched[2]] = {**rows[patched[2]], "result": 1}

    at = datetime(2025, 1, 1, tzinfo=UTC)
    imported = import_paper(rows, "imp", SYNTHETIC, occurred_at=at).events
    again_ids = import_paper(rows, "imp", SYNTHETIC, occurred_at=at).events
    assert again_ids == imported  # deterministic ids
    assert all(e.producer == "history:import" and e.search_id == "imp" for e in imported)
    assert isinstance(imported[-1], ev.SearchStarted) and isinstance(
        imported[-2], ev.SearchCompleted
    )
    assert imported[-2].reason == "imported"
    assert imported[-1].environment_digest == SYNTHETIC.digest()
    assert [e.generation for e in imported if isinstance(e, ev.GenerationAdvanced)] == [0, 1, 2]
    statuses = [e.status for e in imported if isinstance(e, ev.RunCompleted)]
    assert statuses.count("failed") == 1 and len(statuses) == len(rows) - len(failed)

    again = export_paper(imported)
    expected = [{**r, "result": {"score": 1.0} if r["result"] == 1 else r["result"]} for r in rows]
    assert again == expected
    assert json.loads(json.dumps(again)) == again

    # nothing imported is acted on: a fresh evolver folds it as completed and decides nothing
    world = Recorder().run(*imported)
    assert world.log == imported


def test_import_rejects_rows_it_cannot_read() -> None:
    row = {
        "ideator_model": "m",
        "executor_model": "m",
        "env": "synthetic",
        "epoch": 0,
        "idea": "x",
        "code_diff": "",
        "result": None,
    }
    with pytest.raises(HistoryError, match="missing field"):
        import_paper([{"idea": "x"}], "imp", None)
    with pytest.raises(HistoryError, match="epoch must be"):
        import_paper([{**row, "epoch": -1}], "imp", None)
    with pytest.raises(HistoryError, match="2 environments"):
        import_paper([row, {**row, "env": "nanogpt"}], "imp", None)
    with pytest.raises(HistoryError, match="no rows"):
        import_paper([], "imp", None)


def test_datasets_loads_the_exported_jsonl(recorded: Recorder, tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = export_paper(recorded.search("src"))
    path = tmp_path / "trajectories.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert loaded.num_rows == len(rows)
    assert loaded.features["result"]["score"].dtype == "float64"
    assert loaded.features["epoch"].dtype == "int64"
    assert loaded[0]["idea"] == rows[0]["idea"]
    assert [r["result"] for r in loaded] == [r["result"] for r in rows]
