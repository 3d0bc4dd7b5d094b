"""`replay rebuild`'s batched fold gives exactly the tables the live projector gives folding
the same log one event per transaction: a log of many interleaved searches with every event
type (stopped searches, shortfalls, a retried start, a second completion), read from a real
nats-server, folded into real SQLite files. The batched fold keeps rows in memory between
batches and commits rarely (LogFold as sole writer); each of its ways of knowing what the
tables hold (all in memory, keys remembered after rows are dropped, asking the database,
tables not empty at the start) is checked against the same reference."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from groundloop import events as ev
from groundloop.api.projector import LogFold, apply, bulk_connection, project_all
from groundloop.api.rebuild import rebuild
from groundloop.api.store import create_tables, make_engine, table_snapshot
from groundloop.bus import Bus
from groundloop.search_index import fitting_events
from groundloop.settings import Settings
from tests.search_story import search_story


def _stopped(search_id: str) -> list[ev.Event]:
    """A search whose model went away: no SearchCompleted, a SearchStopped instead, after a
    generation that came up short of ideas."""
    story = search_story(search_id, generations=2, ideas_per_generation=4, seed=9)
    story = [e for e in story if not isinstance(e, ev.SearchCompleted)]
    last = story[-1]
    gen = next(e for e in reversed(story) if isinstance(e, ev.GenerationAdvanced))
    return story + [
        gen.derive(
            ev.IdeasShortfall,
            "ideator",
            50,
            generation=gen.generation,
            planned=4,
            proposed=2,
            reason="no untried knob left",
            occurred_at=last.occurred_at + timedelta(seconds=1),
        ),
        gen.derive(
            ev.SearchStopped,
            "ideator",
            51,
            stage="ideator",
            reason="model unreachable",
            error_type="LLMUnreachable",
            occurred_at=last.occurred_at + timedelta(seconds=2),
        ),
    ]


def _second_thoughts(story: list[ev.Event]) -> list[ev.Event]:
    """Events a redelivered handler adds under new ids, published long after the rest: a
    retried start of a run (attempt 2) and an earlier, failed completion of the same run;
    a late SearchStopped after the search completed (the completion outranks it)."""
    started = next(e for e in story if isinstance(e, ev.RunStarted))
    completed = next(
        e for e in story if isinstance(e, ev.RunCompleted) and e.run_id == started.run_id
    )
    done = next(e for e in story if isinstance(e, ev.SearchCompleted))
    return [
        started.model_copy(
            update={"event_id": ev.stable_id(started.event_id, "retry"), "attempt": 2}
        ),
        completed.model_copy(
            update={
                "event_id": ev.stable_id(completed.event_id, "again"),
                "status": "failed",
                "score": None,
                "reward": 0.0,
                "metrics": {},
                "occurred_at": completed.occurred_at - timedelta(seconds=30),
            }
        ),
        done.derive(
            ev.SearchStopped,
            "evolver",
            7,
            stage="user",
            reason="stopped by hand",
            occurred_at=done.occurred_at + timedelta(minutes=1),
        ),
    ]


def many_searches() -> list[ev.Event]:
    """Twelve searches of different sizes, their events interleaved one by one as concurrent
    searches write them (each search's own order kept), then the late events."""
    stories = [
        search_story(f"s{i}", generations=1 + i % 4, ideas_per_generation=3 + (2 * i) % 7, seed=i)
        for i in range(10)
    ] + [_stopped("stop1"), _stopped("stop2")]
    log: list[ev.Event] = []
    for step in range(max(len(s) for s in stories)):
        log += [s[step] for s in stories if step < len(s)]
    return log + _second_thoughts(stories[3]) + _second_thoughts(stories[6])


LOG = many_searches()


def test_the_log_has_every_event_type_and_fits():
    assert {type(e) for e in LOG} == set(ev.EVENT_TYPES)
    assert fitting_events(LOG) == LOG  # nothing a fold would leave out: the comparison is fair
    assert len({e.search_id for e in LOG}) == 12


async def _published(settings: Settings) -> list[tuple[int, ev.Event]]:
    bus = await Bus.connect(settings, "t")
    try:
        for event in LOG:
            await bus.publish(event)
        return [pair async for pair in bus.raw_events()]
    finally:
        await bus.close()


def _event_by_event(pairs: list[tuple[int, ev.Event]], path: Path) -> dict:
    """The live projector's way: one transaction per event, `apply` (which skips an event
    it has applied already)."""
    engine = make_engine(f"sqlite:///{path}")
    create_tables(engine)
    with Session(engine) as session:
        applied = [apply(session, event, seq=seq) for seq, event in pairs]
    assert sum(applied) == len({e.event_id for _, e in pairs})
    snapshot = table_snapshot(engine)
    engine.dispose()
    return snapshot


def _with_repeats(pairs: list[tuple[int, ev.Event]]) -> list[tuple[int, ev.Event]]:
    """The log with a few events stored again further on (republished after the broker's
    duplicate window): applied once, wherever a fold meets them again."""
    end = pairs[-1][0]
    again = [e for _, e in pairs[100:500:37]]
    return pairs + [(end + k, e) for k, e in enumerate(again, 1)]


async def test_rebuild_equals_the_event_by_event_fold(
    settings: Settings, tmp_path: Path, db_url: str
):
    """Into SQLite, and into PostgreSQL (when reachable) through the same scratch file."""
    pairs = await _published(settings)
    assert [e for _, e in pairs] == LOG
    expected = _event_by_event(pairs, tmp_path / "one-by-one.db")
    assert len(expected["processed_events"]) == len(LOG)

    target = settings.model_copy(update={"db_url": db_url})
    report = await rebuild(target, batch_size=64)  # many batches: rows carried between them
    assert report.events == report.applied == len(LOG)
    engine = make_engine(db_url)
    assert table_snapshot(engine) == expected
    statuses = {s["search_id"]: s["status"] for s in expected["searches"]}
    assert statuses["stop1"] == "stopped" and statuses["s3"] == "completed"
    engine.dispose()


# (events per commit, rows cached, keys remembered): everything in memory; rows dropped at
# every commit but their keys remembered; too many keys, so it asks the database again.
MODES = {
    "in memory": (20_000, 50_000, 2_000_000),
    "in memory, a commit every 50": (50, 50_000, 2_000_000),
    "rows dropped, keys kept": (50, 40, 10**9),
    "asks the database": (50, 40, 100),
    "a commit per batch, nothing kept": (1, 0, 0),
}


async def test_each_way_of_knowing_the_tables_gives_the_same_tables(
    settings: Settings, tmp_path: Path
):
    pairs = _with_repeats(await _published(settings))
    expected = _event_by_event(pairs, tmp_path / "one-by-one.db")
    for name, (per_commit, cached, known) in MODES.items():
        engine = make_engine(f"sqlite:///{tmp_path / name}.db", scratch=True)
        create_tables(engine)
        with bulk_connection(engine) as conn:
            log_fold = LogFold(
                conn,
                sole_writer=True,
                events_per_commit=per_commit,
                cached_rows=cached,
                known=known,
            )
            applied = sum(log_fold.add(pairs[i : i + 13]) for i in range(0, len(pairs), 13))
            log_fold.finish()
        assert applied == len(LOG), name
        assert log_fold.remembers_all == (known > len(LOG)), name
        assert table_snapshot(engine) == expected, name
        engine.dispose()


@pytest.mark.parametrize("done", [1, 400])
async def test_a_sole_writer_fold_over_tables_already_holding_part_of_the_log(
    settings: Settings, tmp_path: Path, done: int
):
    """Not empty at the start: it asks the database what is there, skips what was applied,
    and folds the rest into the rows already written."""
    pairs = await _published(settings)
    expected = _event_by_event(pairs, tmp_path / "one-by-one.db")
    engine = make_engine(f"sqlite:///{tmp_path / 'resumed.db'}")
    create_tables(engine)
    assert project_all(engine, pairs[:done], batch_size=50) == done
    with bulk_connection(engine) as conn:
        log_fold = LogFold(conn, sole_writer=True, events_per_commit=100)
        assert not log_fold.remembers_all
        applied = sum(log_fold.add(pairs[i : i + 64]) for i in range(0, len(pairs), 64))
        log_fold.finish()
    assert applied == len(LOG) - done
    assert table_snapshot(engine) == expected
    engine.dispose()
