"""The log survives a broker crash, and the projections can always be rebuilt from it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from sqlalchemy import text

from groundloop.api.projector import project_all
from groundloop.api.rebuild import rebuild
from groundloop.api.service import run as run_projector
from groundloop.api.store import create_tables, make_engine, table_snapshot
from groundloop.broker import NatsServer, free_port
from groundloop.bus import Bus
from groundloop.settings import Settings
from tests.factories import one_search
from tests.waiting import eventually


async def projected(engine, count: int, timeout: float = 60.0) -> None:
    """Wait until the projector has recorded `count` processed events."""
    create_tables(engine)  # the projector may not have started yet

    def done() -> bool:
        with engine.connect() as conn:
            return conn.execute(text("select count(*) from processed_events")).scalar() >= count

    await eventually(done, timeout=timeout, what=f"{count} events projected")


def expected_tables(events, tmp_path: Path) -> dict:
    engine = make_engine(f"sqlite:///{tmp_path / 'expected.db'}")
    create_tables(engine)
    project_all(engine, events)
    return table_snapshot(engine)


async def test_rebuild_gives_identical_tables(settings: Settings, tmp_path: Path):
    bus = await Bus.connect(settings, "t")
    events = one_search("a", ideas=5) + one_search("b", ideas=3)
    for event in events:
        await bus.publish(event)
    stop = asyncio.Event()
    projector = asyncio.create_task(run_projector(settings, stop))
    engine = make_engine(settings.resolved_db_url())
    await projected(engine, len(events))
    stop.set()
    await projector
    live = table_snapshot(engine)
    assert len(live["runs"]) == 8 and len(live["ideas"]) == 8

    report = await rebuild(settings)
    assert report.events == len(events) and report.applied == len(events)
    assert table_snapshot(engine) == live == expected_tables(events, tmp_path)
    await bus.close()


async def test_broker_sigkill_mid_stream_loses_nothing_and_projects_once(tmp_path: Path):
    server = NatsServer(tmp_path / "nats", free_port()).start()
    settings = Settings(
        nats_url=server.url,
        data_dir=tmp_path / "data",
        db_url=f"sqlite:///{tmp_path / 'p.db'}",
        ack_wait_s=2.0,
    )
    events = [e for i in range(6) for e in one_search(f"crash{i}", ideas=4)]
    half = len(events) // 2
    publisher = await Bus.connect(settings, "publisher")
    stop = asyncio.Event()
    projector = asyncio.create_task(run_projector(settings, stop))
    engine = make_engine(settings.resolved_db_url())
    try:
        acked = [await publisher.publish(e) for e in events[:half]]
        server.kill()  # SIGKILL: no flush, no goodbye

        def restart_later() -> None:
            time.sleep(1.0)  # the scenario: the broker stays down while events are published
            server.start()

        restart = asyncio.get_running_loop().run_in_executor(None, restart_later)
        # Published while the broker is down: the publisher retries until it is back.
        acked += [await publisher.publish(e) for e in events[half:]]
        await restart
        assert all(not a.refused for a in acked)
        await projected(engine, len(events))
        state = await publisher.stream_state()
        assert state["messages"] == len(events), "an event was lost or stored twice"
        replayed = [e async for e in publisher.events()]
        assert [e.event_id for e in replayed] == [e.event_id for e in events]
        assert table_snapshot(engine) == expected_tables(events, tmp_path)
    finally:
        stop.set()
        await asyncio.wait_for(projector, 30)
        await publisher.close()
        server.stop()
