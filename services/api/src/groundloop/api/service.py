"""The projector service: folds every event on the bus into the SQL projections.

Consumes: every event of every search, through the durable consumer "projector", shared by
its replicas: each is delivered some of the events and folds them into the same database;
every fold reads its rows under the write lock (`projector.apply`), so no replica's change is
overwritten by another's fold of an older read. Emits: nothing.
Each event's projection change and its processed_events record commit together, so a
redelivery after a crash between commit and ack changes nothing. An event that does not fit
its search's log (groundloop.search_index) is refused (quarantined, dead-lettered), the
same entries `replay rebuild` leaves out: the verdict depends only on the log before it.

`PROJECTOR` declares the role for groundloop.skeleton; `await run(settings, stop)` serves it.
Run alone:  python -m groundloop.api --no-http
Rebuild from the log: `groundloop replay rebuild` (builds the tables afresh from the log and swaps them in only when done).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session

from groundloop.api.projector import ROLE, apply
from groundloop.api.store import create_tables, make_engine
from groundloop.bus import Bus, describe
from groundloop.consumer import Delivery, Reject
from groundloop.events import Event
from groundloop.search_index import LogIndex
from groundloop.settings import Settings
from groundloop.skeleton import Role, run_role

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectorDeps:
    engine: Engine
    log_index: LogIndex | None = None  # does an event fit its search's log?


def handle(event: Event, deps: ProjectorDeps, seq: int | None = None) -> list[Event]:
    """Apply one event to the projections (a no-op if already applied). Emits nothing."""
    with Session(deps.engine) as session:
        if not apply(session, event, ROLE, seq):
            log.debug("%s already projected; skipped", describe(event))
    return []


async def on_event(event: Event, delivery: Delivery, deps: ProjectorDeps) -> list[Event]:
    # Blocking SQL runs in a worker thread so the consumer loop keeps acking and heartbeating.
    seq = delivery.msg.metadata.sequence.stream if delivery.msg is not None else None
    if deps.log_index is not None and seq is not None:
        if (why := await deps.log_index.refusal(event, seq)) is not None:
            raise Reject(f"not projected: {why}")
    return await asyncio.to_thread(handle, event, deps, seq)


@contextlib.asynccontextmanager
async def projections(
    settings: Settings, bus: Bus, _stop: asyncio.Event
) -> AsyncIterator[ProjectorDeps]:
    engine = make_engine(settings.resolved_db_url())
    try:
        create_tables(engine)
        log.info("projector: folding into %s", engine.url.render_as_string())
        yield ProjectorDeps(engine, LogIndex(bus))
    finally:
        engine.dispose()


# history=True: copied (forked/imported) events are projected like any other;
# dedupe=False: processed_events is written in the same SQL transaction as the fold.
PROJECTOR = Role(
    name=ROLE,
    consumes=(),
    deps=projections,
    handle=on_event,
    history=True,
    dedupe=False,
)


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Project the bus until `stop` is set."""
    await run_role(PROJECTOR, settings, stop or asyncio.Event())
