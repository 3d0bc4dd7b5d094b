"""The live projector keeps the rows it folded from one transaction to the next (SQLite), and
must drop them whenever anything else may have changed the tables: another connection's
commit (a projector replica, a rebuild's swap), DDL, a write through the same connection
outside `apply`, or its own failed transaction. Each case must still end in the tables the
batched fold of the same events gives."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from groundloop import events as ev
from groundloop.api.projector import apply, project_all
from groundloop.api.store import PROJECTION_TABLES, make_engine, reset_tables, table_snapshot
from tests.projections import STORY, apply_each, fresh_engine

REFERENCE = (lambda engine: (project_all(engine, STORY), table_snapshot(engine))[1])(fresh_engine())


def test_replicas_taking_turns_on_one_file_fold_what_one_projector_folds(tmp_path: Path):
    """Each replica's kept rows go stale as soon as another one commits (an idea's run
    counts, say): every turn must read them again."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    replicas = [fresh_engine(url)] + [make_engine(url) for _ in range(2)]
    for i, event in enumerate(STORY):
        assert apply_each(replicas[(i // 3) % 3], [event]) == [True]
    assert table_snapshot(replicas[0]) == REFERENCE
    for i, engine in enumerate(replicas):  # redeliveries to any replica change nothing
        assert apply_each(engine, STORY[i::3]) == [False] * len(STORY[i::3])
    assert table_snapshot(replicas[0]) == REFERENCE


def test_replicas_folding_at_once_from_threads_fold_what_one_projector_folds(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    replicas = [fresh_engine(url)] + [make_engine(url) for _ in range(2)]
    failures: list[BaseException] = []

    def replica(engine, share) -> None:
        try:
            assert apply_each(engine, share) == [True] * len(share)
        except BaseException as exc:  # surfaced below: a thread's assert is otherwise lost
            failures.append(exc)

    threads = [
        threading.Thread(target=replica, args=(engine, STORY[i::3]))
        for i, engine in enumerate(replicas)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert table_snapshot(replicas[0]) == REFERENCE


@pytest.mark.parametrize("change", ["delete rows", "recreate tables"])
def test_a_write_through_the_same_connection_outside_apply_drops_the_kept_rows(change):
    """In-memory SQLite: one connection for everyone, so no other connection's commit shows.
    Deleting rows (total_changes) or recreating the tables (schema_version) must still make
    the projector read them again rather than update rows that are no longer there."""
    engine = fresh_engine()
    assert apply_each(engine, STORY) == [True] * len(STORY)
    if change == "recreate tables":
        reset_tables(engine)
    else:
        with engine.begin() as conn:
            for table in PROJECTION_TABLES:
                conn.execute(table.delete())
    assert all(rows == [] for rows in table_snapshot(engine).values())
    assert apply_each(engine, STORY) == [True] * len(STORY)
    assert table_snapshot(engine) == REFERENCE


def test_a_failed_apply_keeps_none_of_its_changes_for_the_next_event():
    """A run's completion is refused after it was folded into the (kept) run and idea rows;
    the events after it, and its own retry, must fold into the rows as committed."""
    at, completed = next(
        (i, e)
        for i, e in enumerate(STORY)
        if isinstance(e, ev.RunCompleted)
        and any(getattr(later, "idea_id", None) == e.idea_id for later in STORY[i + 1 :])
    )
    without = fresh_engine()
    project_all(without, STORY[:at] + STORY[at + 1 :])
    engine = fresh_engine()
    with engine.begin() as conn:  # DDL before any apply: nothing changes the schema later
        conn.execute(
            text(
                "CREATE TRIGGER refuse BEFORE INSERT ON processed_events "
                f"WHEN NEW.event_id = '{completed.event_id}' "
                "BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
            )
        )
    with Session(engine) as session:
        assert [apply(session, e) for e in STORY[:at]] == [True] * at
        with pytest.raises(DBAPIError, match="refused by test"):
            apply(session, completed)
        rest = STORY[at + 1 :]
        assert [apply(session, e) for e in rest] == [True] * len(rest)
    assert table_snapshot(engine) == table_snapshot(without)
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER refuse"))
    assert apply_each(engine, [completed]) == [True]
    assert table_snapshot(engine) == REFERENCE
