"""`groundloop search`'s progress display computed by aggregate queries shows what the whole
leaderboard and every run of the search give, and its queries run off the event loop that
every role of the embedded search shares."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlmodel import Session

from groundloop.api import ranking
from groundloop.api.projector import project_all
from groundloop.api.store import make_engine, reset_tables
from groundloop.api.usage import model_usage
from groundloop.cli.progress import idea_counts, progress, shown, watch
from groundloop.settings import Settings
from tests import factories as f
from tests.random_searches import random_search


def _progress_from_every_run(session: Session, search_id: str) -> list[tuple[str, str]]:
    """The display as it was computed from every run's row and the whole leaderboard."""
    runs = ranking.search_runs(session, search_id)
    board = ranking.leaderboard(session, search_id, include_baseline=False)
    return shown(
        *idea_counts(session, search_id),
        sum(1 for r in runs if r.completed_at is not None),
        sum(1 for r in runs if r.status == "running"),
        ranking.baseline_scores(runs),
        board[0] if board else None,
        model_usage(session, search_id),
    )


def test_the_display_equals_the_one_from_every_run():
    rng = random.Random(7)
    shown_leaders = set()
    for _ in range(40):
        engine = make_engine("sqlite://")
        reset_tables(engine)
        direction = rng.choice(["maximize", "minimize"])
        project_all(
            engine, random_search(rng, "s1", direction) + random_search(rng, "s2", direction)
        )
        with Session(engine) as session:
            pairs, row = progress(session, "s1")
            assert row is not None and row.search_id == "s1"
            assert [label for label, _ in pairs[:2]] == ["search", "generation"]
            assert pairs[2:] == _progress_from_every_run(session, "s1")
            shown_leaders.add(dict(pairs)["best so far (search split)"])
        engine.dispose()
    assert "-" in shown_leaders and len(shown_leaders) > 10  # the cases did vary


async def test_watch_queries_the_runs_off_the_event_loop(tmp_path: Path, capsys: Any):
    settings = Settings(db_url=f"sqlite:///{tmp_path / 'p.db'}", data_dir=tmp_path)
    engine = make_engine(settings.resolved_db_url())
    reset_tables(engine)
    project_all(engine, f.one_search("s1", ideas=3))
    engine.dispose()
    threads: set[int] = set()

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM runs" in statement:
            threads.add(threading.get_ident())

    event.listen(Engine, "before_cursor_execute", record)
    try:
        row = await watch(settings, "s1", asyncio.Event(), [])
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert row is not None and row.status == "completed"
    assert threads and threading.get_ident() not in threads
    assert "runs done / in flight: 3 / 0" in capsys.readouterr().out
