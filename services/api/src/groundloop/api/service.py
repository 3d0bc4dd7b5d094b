"""The projector service: folds every event on the bus into the SQL projections.

Consumes: every event of every search, through the durable consumer "projector" (one
replica: the fold assumes a single writer per role, see projector.py). Emits: nothing.
Each event's projection change and its processed_events record commit together, so a
redelivery after a crash between commit and ack changes nothing.

Run alone:  python -m groundloop.api --no-http
Rebuild from the log: `groundloop replay rebuild` (drops the tables, then `project_all`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session

from groundloop.api.projector import ROLE, apply
from groundloop.bus import Bus, describe
from groundloop.consumer import Delivery, consume
from groundloop.events import Event
from groundloop.settings import Settings
from groundloop.api.store import create_tables, make_engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectorDeps:
    engine: Engine


def handle(event: Event, deps: ProjectorDeps, seq: int | None = None) -> list[Event]:
    """Apply one event to the projections (a no-op if already applied). Emits nothing."""
    with Session(deps.engine) as session:
        if not apply(session, event, ROLE, seq):
            log.debug("%s already projected; skipped", describe(event))
    return []


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Project the bus until `stop` is set (blocking SQL runs in a worker thread so the
    consumer loop keeps acking and heartbeating)."""
    stop = stop or asyncio.Event()
    engine = make_engine(settings.resolved_db_url())
    create_tables(engine)
    deps = ProjectorDeps(engine)
    bus = await Bus.connect(settings, ROLE)

    async def on_event(event: Event, delivery: Delivery) -> list[Event]:
        seq = delivery.msg.metadata.sequence.stream if delivery.msg is not None else None
        return await asyncio.to_thread(handle, event, deps, seq)

    log.info("projector: folding %s into %s", bus.subject_filter(), engine.url.render_as_string())
    try:
        # history=True: copied (forked/imported) events are projected like any other;
        # dedupe=False: processed_events is written in the same SQL transaction as the fold.
        await consume(bus, ROLE, [bus.subject_filter()], on_event, stop=stop, history=True, dedupe=False)
    finally:
        await bus.close()
        engine.dispose()
