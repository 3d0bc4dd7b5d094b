"""Replay: the log is the truth; projections are rebuilt from it at will.

`rebuild` folds the whole stream, in publish order, into fresh tables in a scratch SQLite file,
and only when the fold has finished swaps them in for the live tables in one transaction: a
rebuild that fails or is interrupted leaves the old tables exactly as they were, and readers
see either the old tables or the new ones, never a half-built read side. The new tables come
out identical to the live ones (every timestamp in them comes from events, never the clock).
Entries of the log that are not valid events are quarantined and skipped (`Bus.read`).

The swap needs transactional DDL: SQLite and PostgreSQL have it; other databases are refused.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, insert, make_url, select
from sqlalchemy.schema import CreateIndex, CreateTable

from groundloop.api.store import PROJECTION_TABLES, create_tables, make_engine
from groundloop.bus import Bus
from groundloop.events import Event
from groundloop.settings import Settings

SWAPPABLE = ("sqlite", "postgresql")
COPY_ROWS = 5000  # rows per INSERT when copying into a non-SQLite database


class RebuildRefused(RuntimeError):
    pass


@dataclass(frozen=True)
class RebuildReport:
    events: int
    applied: int
    seconds: float  # reading and folding the log, without the swap
    cpu_seconds: float = 0.0  # this process's CPU time in `seconds` (not nats-server's)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


# What a rebuild folds: (stream seq, event) pairs in stream order, read over the given bus.
Source = Callable[[Bus], AsyncIterator[tuple[int, Event]]]


async def rebuild(
    settings: Settings, batch_size: int = 1000, source: Source | None = None
) -> RebuildReport:
    """Fold the whole log (or `source`, e.g. the log with archived searches merged back in)
    into new tables, then swap them in for the projections."""
    url = settings.resolved_db_url()
    backend = make_url(url).get_backend_name()
    if backend not in SWAPPABLE:
        raise RebuildRefused(
            f"cannot rebuild into {backend}: swapping in the rebuilt tables needs transactional "
            f"DDL ({', '.join(SWAPPABLE)}); point GROUNDLOOP_DB_URL at one of those"
        )
    target = make_engine(url)
    try:
        # The swap replaces the tables (even ones of an older layout), so they must exist.
        create_tables(target, outdated_ok=True)
        with tempfile.TemporaryDirectory(prefix="groundloop-rebuild-", dir=_scratch_dir(url)) as d:
            path = Path(d) / "rebuilt.db"
            scratch = make_engine(f"sqlite:///{path}", scratch=True)
            try:
                create_tables(scratch)
                report = await _fold(settings, scratch, batch_size, source)
            finally:
                scratch.dispose()
            _swap(target, path)
    finally:
        target.dispose()
    return report


def _scratch_dir(url: str) -> str | None:
    """Next to a SQLite file (same disk, which has room for it); else the temp dir."""
    database = make_url(url).database
    if make_url(url).get_backend_name() == "sqlite" and database and database != ":memory:":
        return str(Path(database).resolve().parent)
    return None


async def _fold(
    settings: Settings, engine: Engine, batch_size: int, source: Source | None
) -> RebuildReport:
    bus = await Bus.connect(settings, "replay")
    started, cpu = time.perf_counter(), time.process_time()
    # Nothing here makes reference cycles worth collecting, and the cyclic GC's full passes
    # over a large process were a third of the rebuild time.
    gc.disable()
    try:
        pairs = source(bus) if source else bus.raw_events(batch=batch_size)
        seen, applied = await _fold_into(engine, pairs, batch_size)
    finally:
        # After the fold's rows and indexes are freed (by reference counting, on return
        # above): re-enabled with them alive, the first collection would walk them all.
        gc.enable()
        await bus.close()
    return RebuildReport(seen, applied, time.perf_counter() - started, time.process_time() - cpu)


async def _fold_into(
    engine: Engine, pairs: AsyncIterator[tuple[int, Event]], batch_size: int
) -> tuple[int, int]:
    """(events seen, events applied). One connection for the whole log (one final sync).
    Folding runs in this thread between reads: a worker thread would fight the event loop
    for the GIL. The scratch file is ours alone until the swap, so the fold keeps rows
    between batches (LogFold's sole writer)."""
    from groundloop.api.projector import LogFold, bulk_connection  # the read side owns the fold

    seen = applied = 0
    batch: list[tuple[int, Event]] = []
    with bulk_connection(engine) as conn:
        log_fold = LogFold(conn, sole_writer=True)
        async for pair in pairs:  # (stream seq, event)
            batch.append(pair)
            if len(batch) >= batch_size:
                applied += log_fold.add(batch)
                seen, batch = seen + len(batch), []
        applied += log_fold.add(batch) if batch else 0
        seen += len(batch)
        log_fold.finish()
    return seen, applied


def _swap(target: Engine, rebuilt: Path) -> None:
    if target.dialect.name == "sqlite":
        _swap_sqlite(target, rebuilt)
    else:
        _swap_copy(target, rebuilt)


def _swap_sqlite(target: Engine, rebuilt: Path) -> None:
    """Replace the tables from the attached scratch file in one write transaction. Names are
    schema-qualified: unqualified, SQLite would resolve a table missing from main to the
    attached file's table of the same name."""
    with target.connect() as conn:
        conn.exec_driver_sql("ATTACH DATABASE ? AS rebuilt", (str(rebuilt),))
        conn.commit()
        try:
            # pysqlite opens no transaction before DDL by itself; an explicit one makes the
            # drops, creates and copies one atomic change (SQLite DDL is transactional).
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            for table in PROJECTION_TABLES:
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS main."{table.name}"')
            for table in PROJECTION_TABLES:
                conn.execute(CreateTable(table))  # unqualified CREATE goes to main
                for index in table.indexes:
                    conn.execute(CreateIndex(index))
                columns = ", ".join(f'"{c.name}"' for c in table.columns)
                conn.exec_driver_sql(
                    f'INSERT INTO main."{table.name}" ({columns}) '
                    f'SELECT {columns} FROM rebuilt."{table.name}"'
                )
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.exec_driver_sql("DETACH DATABASE rebuilt")
            conn.commit()


def _swap_copy(target: Engine, rebuilt: Path) -> None:
    """PostgreSQL: drop, create and fill in one transaction (its DDL is transactional, and
    readers wait on the drop's lock until the new tables are committed)."""
    from sqlmodel import SQLModel

    source = make_engine(f"sqlite:///{rebuilt}")
    try:
        with source.connect() as read, target.begin() as write:
            SQLModel.metadata.drop_all(write, tables=PROJECTION_TABLES)
            SQLModel.metadata.create_all(write, tables=PROJECTION_TABLES)
            for table in PROJECTION_TABLES:
                rows = read.execute(select(table)).mappings()
                while chunk := [dict(r) for r in rows.fetchmany(COPY_ROWS)]:
                    write.execute(insert(table), chunk)
    finally:
        source.dispose()
