"""The projection store: engines for SQLite and PostgreSQL, tables, UTC times, snapshots."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import inspect, text
from sqlmodel import Session

from groundloop.api.store import (
    PROJECTION_TABLES,
    IdeaRow,
    ProcessedEvent,
    RunRow,
    SearchRow,
    create_tables,
    drop_tables,
    make_engine,
    reset_tables,
    table_snapshot,
)


def test_sqlite_engine_uses_wal_and_a_busy_timeout(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'nested' / 'dir' / 'p.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    assert (tmp_path / "nested" / "dir" / "p.db").exists()


def test_in_memory_sqlite_keeps_one_database_across_connections():
    engine = make_engine("sqlite://")
    create_tables(engine)
    with Session(engine) as session:
        session.add(SearchRow(search_id="s1"))
        session.commit()
    with Session(engine) as session:
        assert session.get(SearchRow, "s1") is not None


def test_create_and_drop_are_idempotent(db_url):
    engine = make_engine(db_url)
    create_tables(engine)
    create_tables(engine)
    assert {t.name for t in PROJECTION_TABLES} <= set(inspect(engine).get_table_names())
    drop_tables(engine)
    drop_tables(engine)
    assert not {t.name for t in PROJECTION_TABLES} & set(inspect(engine).get_table_names())
    engine.dispose()


def test_times_come_back_as_the_same_utc_instant(db_url):
    engine = make_engine(db_url)
    reset_tables(engine)
    plus_two = timezone(timedelta(hours=2))
    with Session(engine) as session:
        session.add(
            SearchRow(search_id="aware", started_at=datetime(2025, 1, 1, 14, 0, tzinfo=plus_two))
        )
        session.add(SearchRow(search_id="naive", started_at=datetime(2025, 1, 1, 12, 0, 0, 123456)))
        session.commit()
    with Session(engine) as session:
        aware = session.get(SearchRow, "aware").started_at
        naive = session.get(SearchRow, "naive").started_at
    assert aware == datetime(2025, 1, 1, 12, 0, tzinfo=UTC) and aware.tzinfo == UTC
    assert naive == datetime(2025, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)  # naive is read as UTC
    engine.dispose()


def test_snapshot_is_sorted_by_key_and_leaves_out_delivery_columns(db_url):
    engine = make_engine(db_url)
    reset_tables(engine)
    at = datetime(2025, 1, 1, tzinfo=UTC)
    with Session(engine) as session:
        for idea_id in ("c", "a", "b"):
            session.add(
                IdeaRow(idea_id=idea_id, search_id="s", parent_ids=["x"], knobs={"lr": 0.1})
            )
        session.add(RunRow(run_id="r", search_id="s", metrics={"loss": 2.5}, devices=["cuda:0"]))
        session.add(
            ProcessedEvent(
                role="projector",
                event_id="e",
                event_type="RunStarted",
                search_id="s",
                occurred_at=at,
                stream_seq=7,
                processed_at=datetime.now(UTC),
            )
        )
        session.commit()
    snapshot = table_snapshot(engine)
    assert [r["idea_id"] for r in snapshot["ideas"]] == ["a", "b", "c"]
    assert snapshot["ideas"][0]["parent_ids"] == ["x"] and snapshot["ideas"][0]["knobs"] == {
        "lr": 0.1
    }
    assert snapshot["runs"][0]["metrics"] == {"loss": 2.5}
    assert snapshot["processed_events"] == [
        {
            "role": "projector",
            "event_id": "e",
            "event_type": "RunStarted",
            "search_id": "s",
            "occurred_at": at,
        }
    ]
    assert snapshot["searches"] == [] and set(snapshot) == {t.name for t in PROJECTION_TABLES}
    engine.dispose()
