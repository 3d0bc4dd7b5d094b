"""The projector: every event into the SQL projections of groundloop.api.store, exactly once.

Consumes: every event type. Emits: nothing.

`apply(session, event)` folds one event (see folds.py for how each type is folded, and why
the result does not depend on arrival order) and writes its processed_events record in the
same transaction; it returns False, changing nothing, when this role already applied the
event. `project_all(engine, events)` does the same for many events in batched transactions.
Both batch paths go through `LogFold`; `replay rebuild` uses it as the sole writer of its
scratch tables (rows kept in memory between batches, a commit every 20,000 events), with the
tables applying event by event gives (services/api/tests/test_rebuild_equivalence.py; speed:
benchmarks/projection.py).

Given (stream sequence, event) pairs, as `replay rebuild` reads the log, the events come in
log order, and one that does not fit its search's log (groundloop.search_index: a search
never started, an idea never proposed, a run never asked for) is left out, so no orphan row
is created; the live projector refuses the same entries on delivery (the verdict depends
only on the log before the entry), and they are recorded in the quarantine stream there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import islice

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from groundloop import events as ev
from groundloop.api.folds import FOLDS, fold
from groundloop.api.live_rows import LiveRows, lock_for_writing
from groundloop.api.rowset import Key, Rows, driver_call
from groundloop.api.store import (
    PROJECTION_TABLES,
    GenerationRow,
    IdeaRow,
    PatchRow,
    PolicyRow,
    ProcessedEvent,
    RunRow,
    SearchRow,
    as_utc,
)
from groundloop.search_index import SearchIndex

ROLE = "projector"
log = logging.getLogger(__name__)
__all__ = ["FOLDS", "ROLE", "LogFold", "apply", "apply_many", "fold", "project_all"]


def _record_processed(
    rows: Rows, role: str, event: ev.Event, seq: int | None, now: datetime, at: datetime
) -> None:
    rows.insert(
        ProcessedEvent,
        {
            "role": role,
            "event_id": event.event_id,
            "event_type": event.type,  # type: ignore[attr-defined]
            "search_id": event.search_id,
            "occurred_at": at,
            "stream_seq": seq,
            "processed_at": now,
        },
    )


def _already_processed(conn: Connection, role: str, event_ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(event_ids), 500):
        chunk = event_ids[start : start + 500]
        if conn.dialect.name == "sqlite":
            # The driver's own query: half the time of SQLAlchemy's, which renders the IN
            # list of up to 500 ids anew for every batch.
            marks = ", ".join("?" * len(chunk))
            found.update(
                event_id
                for (event_id,) in driver_call(
                    conn,
                    f"SELECT event_id FROM processed_events WHERE role = ? AND event_id IN ({marks})",
                    (role, *chunk),
                )
            )
        else:
            processed = ProcessedEvent.__table__.c  # type: ignore[attr-defined]
            found.update(
                conn.scalars(
                    select(processed.event_id).where(
                        processed.role == role, processed.event_id.in_(chunk)
                    )
                )
            )
    return found


def apply(session: Session, event: ev.Event, role: str = ROLE, seq: int | None = None) -> bool:
    """Fold `event` and record it as processed by `role`, in one transaction that this call
    commits (or rolls back, re-raising). False, changing nothing, if already processed."""
    return apply_many(session, [(event, seq)], role)[0]


def apply_many(
    session: Session, entries: Sequence[tuple[ev.Event, int | None]], role: str = ROLE
) -> list[bool]:
    """`apply` for several (event, stream sequence) pairs in one transaction: one write lock,
    one look-up of what was processed, one flush and commit (the live projector's events that
    arrive together). Each pair's result is `apply`'s: False for an event already processed,
    or a second copy of one in `entries`. Anything failing rolls back all of them and raises;
    the caller then applies them one by one, so a bad event fails alone."""
    try:
        conn = session.connection()
        lock_for_writing(conn)
        done = _already_processed(conn, role, [event.event_id for event, _ in entries])
        if len(done) == len(entries):
            session.rollback()
            return [False] * len(entries)
        live = LiveRows(conn)
        now, applied = datetime.now(UTC), []
        for event, seq in entries:
            applied.append(event.event_id not in done)
            if not applied[-1]:
                continue
            done.add(event.event_id)
            at = as_utc(event.occurred_at)
            fold(live.rows, event, at)
            _record_processed(live.rows, role, event, seq, now, at)
        live.rows.flush()
        live.written()
        session.commit()
        live.keep()
        return applied
    except IntegrityError:
        session.rollback()
        # Another writer applied the same event concurrently: its transaction won.
        if len(entries) == 1 and _already_processed(
            session.connection(), role, [entries[0][0].event_id]
        ):
            session.rollback()
            return [False]
        raise
    except BaseException:
        session.rollback()
        raise


def project_all(
    engine: Engine,
    events: Iterable[ev.Event | tuple[int, ev.Event]],
    batch_size: int = 500,
    role: str = ROLE,
    *,
    durable: bool = False,
) -> int:
    """Apply many events in order, `batch_size` per transaction (each event's tracking
    record in the same transaction as its changes). Returns how many were newly applied;
    already-processed ones are skipped, so an interrupted fold can simply be re-run.
    `events` may be events or (stream sequence, event) pairs as `Bus.raw_events` yields;
    the sequence is then kept in the tracking record, as the live projector does.

    durable=False: on SQLite, batches are committed without fsync and the file is synced
    once at the end — several times faster on virtual disks. A process crash loses nothing
    committed; a power cut mid-fold can damage the file, which is then rebuilt again from
    the log. durable=True keeps the engine's own setting for every batch."""
    applied = 0
    with bulk_connection(engine, durable=durable) as conn:
        log_fold = LogFold(conn, role)
        for batch in _batches(events, batch_size):
            applied += log_fold.add(batch)
    return applied


@contextmanager
def bulk_connection(engine: Engine, *, durable: bool = False) -> Iterator[Connection]:
    """A connection for many batches; see project_all for what durable=False means."""
    with engine.connect() as conn:
        if conn.dialect.name != "sqlite" or durable:
            yield conn
            return
        previous = int(conn.exec_driver_sql("PRAGMA synchronous").scalar_one())
        conn.exec_driver_sql("PRAGMA synchronous=OFF")
        conn.commit()
        try:
            yield conn
        finally:
            conn.rollback()
            conn.exec_driver_sql(f"PRAGMA synchronous={previous}")
            conn.exec_driver_sql("PRAGMA wal_checkpoint(FULL)")  # syncs what was written
            conn.commit()


class LogFold:
    """Folds batches of events, or of (stream sequence, event) pairs in log order, through
    one connection (see bulk_connection). Given sequences, one SearchIndex over every batch
    leaves out the events that do not fit the log before them; an event already applied is
    skipped.

    By default each batch is one transaction with its rows read afresh: other writers (a
    live projector) may share the tables. `sole_writer=True` is for tables nobody else
    writes or reads until the fold is over (`replay rebuild`'s scratch file):
    - rows stay cached from batch to batch (read once, not once per batch touching them),
      and are written every `events_per_commit` events (a row changed by several batches
      is written once per commit, not once per batch);
    - if the tables were empty at the start, what is not in them is known without asking:
      a row or tracking record this fold did not write does not exist (up to `known` row
      keys and `known` event ids remembered; past that, it asks the database as usual).
    Call `finish()` to write the rest. Until then the tables lack what was folded since the
    last commit (and a failure can leave a file without a journal damaged): a sole writer's
    tables are only used once the fold has finished."""

    def __init__(
        self,
        conn: Connection,
        role: str = ROLE,
        *,
        sole_writer: bool = False,
        events_per_commit: int = 20_000,
        cached_rows: int = 50_000,  # 1-2 KB each: past this, rows are dropped at a commit
        known: int = 1_000_000,  # ~100 bytes per key or event id remembered
    ):
        self.conn = conn
        self.role = role
        self.sole_writer = sole_writer
        self.events_per_commit = events_per_commit
        self.cached_rows = cached_rows
        self.known = known
        self.index = SearchIndex()
        # Every event id applied since the tables were empty, or those of the open
        # transaction only (the rest are asked of the database).
        self.remembers_all = sole_writer and _tables_empty(conn)
        self.rows = Rows(conn, empty=self.remembers_all, known=known)
        self.done: set[str] = set()
        self.uncommitted = 0

    def add(self, batch: Sequence[ev.Event | tuple[int, ev.Event]]) -> int:
        """Fold one batch; returns how many of its events were newly applied."""
        pairs: list[tuple[int | None, ev.Event]] = [
            item if isinstance(item, tuple) else (None, item) for item in batch
        ]
        if not self.sole_writer:
            with self.conn.begin():
                self.rows, self.done = Rows(self.conn), set()
                applied = self._fold(pairs)
                self.rows.flush()
            return applied
        applied = self._fold(pairs)
        self.uncommitted += len(pairs)
        if self.uncommitted >= self.events_per_commit:
            self.finish()
        return applied

    def finish(self) -> None:
        """Write and commit what the folded batches changed (sole writer; a no-op otherwise)."""
        if not self.sole_writer:
            return
        self.rows.flush()
        self.conn.commit()
        self.uncommitted = 0
        if self.remembers_all and len(self.done) > self.known:
            self.remembers_all = False  # too many to keep: ask the database from now on
        if not self.remembers_all:
            self.done.clear()  # their tracking records are in the tables now
        if len(self.rows) > self.cached_rows:
            self.rows.forget()

    def _fold(self, pairs: list[tuple[int | None, ev.Event]]) -> int:
        rows, done = self.rows, self.done
        if not self.remembers_all:
            unknown = sorted({e.event_id for _, e in pairs} - done)
            done |= _already_processed(self.conn, self.role, unknown)
        if not rows.knows_every_key:
            _prefetch(rows, [e for _, e in pairs])
        now = datetime.now(UTC)  # one processing time per batch
        applied = 0
        for seq, event in pairs:
            if seq is not None:
                why = self.index.observe(event, seq)
                if why is not None:
                    log.warning("not projected: stream seq %d, %s: %s", seq, event.event_id, why)
                    continue
            if event.event_id in done:
                continue
            done.add(event.event_id)
            at = as_utc(event.occurred_at)
            fold(rows, event, at)
            _record_processed(rows, self.role, event, seq, now, at)
            applied += 1
        return applied


def _tables_empty(conn: Connection) -> bool:
    return all(conn.execute(select(table).limit(1)).first() is None for table in PROJECTION_TABLES)


def _batches(
    events: Iterable[ev.Event | tuple[int, ev.Event]], size: int
) -> Iterator[list[ev.Event | tuple[int, ev.Event]]]:
    it = iter(events)
    while batch := list(islice(it, size)):
        yield batch


def _prefetch(rows: Rows, batch: list[ev.Event]) -> None:
    """Load every row the batch will touch (and is not cached) with a few IN queries."""
    searches: set[Key] = set()
    generations: set[Key] = set()
    policies: set[Key] = set()
    ideas: set[Key] = set()
    patches: set[Key] = set()
    runs: set[Key] = set()
    for e in batch:
        match e:
            case ev.SearchStarted() | ev.SearchCompleted() | ev.SearchStopped():
                searches.add((e.search_id,))
            case ev.GenerationAdvanced():
                searches.add((e.search_id,))
                generations.add((e.search_id, e.generation))
                if e.previous is not None:
                    generations.add((e.search_id, e.previous.generation))
            case ev.IdeaProposed() | ev.PatchFailed():
                ideas.add((e.idea_id,))
            case ev.PatchReady():
                ideas.add((e.idea_id,))
                patches.add((e.patch_id,))
            case ev.RunRequested() | ev.RunStarted() | ev.RunCompleted():
                runs.add((e.run_id,))
                if e.idea_id is not None:
                    ideas.add((e.idea_id,))
            case ev.PolicyUpdated():
                policies.add((e.search_id, e.policy_version))
    rows.prefetch(RunRow, runs)
    for key in runs:  # a run event without an idea id still changes its run's idea
        run = rows.peek(RunRow, key)
        if run is not None and run.idea_id is not None:
            ideas.add((run.idea_id,))
    rows.prefetch(SearchRow, searches)
    rows.prefetch(GenerationRow, generations)
    rows.prefetch(PolicyRow, policies)
    rows.prefetch(IdeaRow, ideas)
    rows.prefetch(PatchRow, patches)
