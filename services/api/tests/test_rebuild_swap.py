"""Replay rebuild swaps in new tables only when it has finished: a rebuild that fails midway
leaves the old tables and their rows as they were."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text

from groundloop import events as ev
from groundloop.api.rebuild import RebuildRefused, rebuild
from groundloop.api.service import run as run_projector
from groundloop.api.store import create_tables, make_engine, table_snapshot
from groundloop.bus import Bus
from groundloop.settings import Settings
from tests.factories import one_search
from tests.waiting import eventually


async def _live_projection(settings: Settings, count: int) -> dict:
    engine = make_engine(settings.resolved_db_url())
    create_tables(engine)
    stop = asyncio.Event()
    projector = asyncio.create_task(run_projector(settings, stop))

    def done() -> bool:
        with engine.connect() as conn:
            return conn.execute(text("select count(*) from processed_events")).scalar() >= count

    await eventually(done, timeout=60, what=f"{count} events projected")
    stop.set()
    await projector
    snapshot = table_snapshot(engine)
    engine.dispose()
    return snapshot


async def test_a_failed_rebuild_leaves_the_old_tables_and_a_good_one_matches_live(
    settings: Settings, tmp_path: Path
):
    bus = await Bus.connect(settings, "t")
    events = one_search("a", ideas=4) + one_search("b", ideas=2)
    for event in events:
        await bus.publish(event)
    live = await _live_projection(settings, len(events))
    assert len(live["ideas"]) == 6

    report = await rebuild(settings, batch_size=3)
    assert report.events == report.applied == len(events)
    engine = make_engine(settings.resolved_db_url())
    assert table_snapshot(engine) == live

    # A valid event the fold cannot store: a generation beyond SQLite's 64-bit integers,
    # after a batch of good events has already been folded into the new tables.
    advanced = next(e for e in events if isinstance(e, ev.GenerationAdvanced))
    await bus.publish(advanced.model_copy(update={"generation": 10**20, "event_id": "huge"}))
    await bus.publish(one_search("c", ideas=1)[0])
    with pytest.raises(OverflowError):
        await rebuild(settings, batch_size=3)
    assert table_snapshot(engine) == live
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("groundloop-rebuild-")]
    assert leftovers == []
    engine.dispose()
    await bus.close()


async def test_a_database_without_transactional_ddl_is_refused(settings: Settings):
    mysql = settings.model_copy(update={"db_url": "mysql://nobody@127.0.0.1/none"})
    with pytest.raises(RebuildRefused, match="transactional DDL"):
        await rebuild(mysql)
