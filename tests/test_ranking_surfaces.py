"""Every surface that says how an idea did shows the same search-split number.

A search in which an idea's final re-evaluation (purpose "reeval", on the `test` split)
scores far better than anything on the search split, and an idea whose single best seed
would win although its mean does not: the report (leaderboard.md / .csv, summary.json), the
API leaderboard, `groundloop search`'s progress line and the ideator's context must all rank
by the mean over search-split runs, show that count, and keep the re-evaluation apart.
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from groundloop import events as ev
from groundloop.api.app import create_app
from groundloop.api.projector import project_all
from groundloop.api.store import make_engine, reset_tables
from groundloop.cli.progress import progress
from groundloop.cli.report import write_report
from groundloop.ideator.history import SearchHistory
from groundloop.manifest import Metric
from groundloop.settings import Settings
from tests import factories as f

METRIC = Metric(name="accuracy", direction="maximize", reward="x", split="val", final_split="test")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
REEVAL = 100.0  # C's re-evaluation on `test`: better than every search-split number


def _at(event: ev.Event, minute: int) -> ev.Event:
    return event.model_copy(update={"occurred_at": T0 + timedelta(minutes=minute)})


def _events() -> tuple[list[ev.Event], dict[str, str]]:
    start = f.search_started("s1")
    ideas = {name: f.idea_proposed("s1", n, title=f"idea {name}") for n, name in enumerate("ABC")}
    ids = {name: i.idea_id for name, i in ideas.items()}

    def run(minute: int, name: str | None, score: float, purpose: str = "search") -> ev.Event:
        run_id = f"{name or 'baseline'}-{purpose}-{minute}"
        idea_id = ids[name] if name else None
        return _at(
            f.run_result("s1", run_id, score=score, purpose=purpose, idea_id=idea_id), minute
        )

    reeval_request = ev.RunRequested(
        search_id="s1",
        producer="evolver",
        run_id="C-reeval-9",
        purpose="reeval",
        idea_id=ids["C"],
        generation=0,
        environment="synthetic",
        environment_digest=f.DIGEST,
        seed=0,
    )
    completed = ev.SearchCompleted(
        search_id="s1",
        producer="evolver",
        reason="generations done",
        best_idea_id=ids["C"],
        best_score=REEVAL,
        baseline_score=1.1,
        final=[
            ev.FinalEvaluation(
                idea_id=ids["C"], scores=[REEVAL], mean=REEVAL, ci95_low=REEVAL, ci95_high=REEVAL
            )
        ],
    )
    events = [
        _at(start, 0),
        *(_at(i, 1) for i in ideas.values()),
        run(2, None, 1.0, "baseline"),
        run(3, None, 1.2, "baseline"),
        run(4, "C", 3.0),
        run(5, "A", 5.0),
        run(6, "B", 6.0),  # B's best seed beats A ...
        run(7, "B", 2.0),  # ... but its mean (4.0) does not
        _at(reeval_request, 8),
        run(9, "C", REEVAL, "reeval"),
        _at(completed, 10),
    ]
    return events, ids


@pytest.fixture
def search(tmp_path: Path):
    settings = Settings(db_url=f"sqlite:///{tmp_path / 'p.db'}", data_dir=tmp_path)
    engine = make_engine(settings.resolved_db_url())
    reset_tables(engine)
    events, ids = _events()
    project_all(engine, events)
    yield settings, engine, events, ids
    engine.dispose()


EXPECTED = [("A", 5.0, 1), ("B", 4.0, 2), ("C", 3.0, 1)]  # (idea, mean on val, runs)


def test_report_ranks_by_search_split_mean_and_keeps_the_reeval_apart(search, tmp_path):
    _, engine, _, ids = search
    names = {v: k for k, v in ids.items()}
    with Session(engine) as session:
        out = write_report(session, "s1", tmp_path / "report", METRIC)

    with (out / "leaderboard.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(names[r["idea_id"]], float(r["score"]), int(r["runs"])) for r in rows] == EXPECTED
    assert {r["split"] for r in rows} == {"val"} and {r["final_split"] for r in rows} == {"test"}
    c = rows[2]
    assert (float(c["final_score"]), int(c["final_runs"]), c["rank"]) == (REEVAL, 1, "3")
    assert rows[1]["best_run_score"] == "6.0" and rows[1]["best_run_id"] == "B-search-6"

    md = (out / "leaderboard.md").read_text()
    board, final = md.split("## Final re-evaluation on `test`")
    assert "- search split `val`: baseline 1.1 (mean of 2 runs), best idea 5 (mean of 1 run)" in md
    table = [line for line in board.splitlines() if line[:3] in ("| 1", "| 2", "| 3")]
    assert [line.split(" | ")[3:5] for line in table] == [["5", "1"], ["4", "2"], ["3", "1"]]
    assert "mean accuracy on `val`" in board and "100" not in board.split("Leaderboard:")[1]
    assert "| idea C | 100 | 1 | 100 |" in final

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["split"], summary["final_split"]) == ("val", "test")
    assert [
        (names[r["idea_id"]], r["score"], r["runs"]) for r in summary["leaderboard"]
    ] == EXPECTED
    curve = [(names[p["idea_id"]], p["mean_score"], p["position"]) for p in summary["best_so_far"]]
    assert curve == [("C", 3.0, 1), ("A", 5.0, 2), ("B", 6.0, 3), ("A", 5.0, 4)]
    assert summary["baseline_scores"] == [1.0, 1.2]


def test_api_leaderboard_shows_search_split_means_and_final_columns(search):
    settings, _, _, ids = search
    names = {v: k for k, v in ids.items()}
    with TestClient(create_app(settings)) as client:
        board = client.get("/searches/s1/leaderboard").json()
    assert [(names[e["idea_id"]], e["mean_score"], e["runs"]) for e in board] == EXPECTED
    assert all(e["split"] == "search" for e in board)
    c = board[2]
    assert (c["rank"], c["best_score"], c["final_mean_score"], c["final_runs"]) == (
        3,
        3.0,
        REEVAL,
        1,
    )
    assert c["runs_succeeded"] == 2  # the count of every run still includes the reeval
    assert board[1]["best_score"] == 6.0 and board[1]["mean_score"] == 4.0


def test_progress_line_shows_the_search_split_leader(search):
    _, engine, _, _ = search
    with Session(engine) as session:
        pairs, row = progress(session, "s1")
    shown = dict(pairs)
    assert row is not None and row.status == "completed"
    assert shown["best so far (search split)"] == "5 (mean of 1 run; idea A)"
    assert shown["baseline (search split)"] == "1, 1.2"


def test_ideator_context_ranks_by_search_split_mean(search):
    _, _, events, ids = search
    history = SearchHistory.from_events("s1", events)
    names = {v: k for k, v in ids.items()}
    ranked = history.ranked()
    assert [(names[r.idea_id], r.mean_score, len(r.scores)) for r in ranked] == EXPECTED
    c = history.ideas[ids["C"]]
    assert c.outcome == "score 3" and history.ideas[ids["B"]].outcome == "score 4 (mean of 2 runs)"
    assert history.baseline_score == pytest.approx(1.1)
