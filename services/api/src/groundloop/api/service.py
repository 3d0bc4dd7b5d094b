"""The projector service: folds every event on the bus into the SQL projections.

Consumes: every event of every search, through the durable consumer "projector", shared by
its replicas: each is delivered some of the events and folds them into the same database;
every fold reads its rows under the write lock (`projector.apply`), so no replica's change is
overwritten by another's fold of an older read. Emits: nothing.
Each event's projection change and its processed_events record commit together, so a
redelivery after a crash between commit and ack changes nothing. Events delivered together
(up to `CONCURRENCY` in hand) are folded in one transaction (`Batches`); when that fails,
each is folded in its own, so a bad event fails alone and the others are not held back.
An event that does not fit its search's log (groundloop.search_index) is refused
(quarantined, dead-lettered), the same entries `replay rebuild` leaves out: the verdict
depends only on the log before it.

`PROJECTOR` declares the role for groundloop.skeleton; `await run(settings, stop)` serves it.
Run alone:  python -m groundloop.api --no-http
Rebuild from the log: `groundloop replay rebuild` (builds the tables afresh from the log and swaps them in only when done).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlmodel import Session

from groundloop.api.projector import ROLE, apply, apply_many
from groundloop.api.store import create_tables, make_engine
from groundloop.bus import Bus, describe
from groundloop.consumer import Delivery, Reject
from groundloop.events import Event
from groundloop.search_index import LogIndex
from groundloop.settings import Settings
from groundloop.skeleton import Role, run_role

log = logging.getLogger(__name__)


# Deliveries one replica holds at once: what arrives together is folded in one transaction.
CONCURRENCY = 32


def handle(event: Event, deps: ProjectorDeps, seq: int | None = None) -> list[Event]:
    """Apply one event to the projections (a no-op if already applied). Emits nothing."""
    with Session(deps.engine) as session:
        if not apply(session, event, ROLE, seq):
            log.debug("%s already projected; skipped", describe(event))
    return []


def handle_batch(
    entries: list[tuple[Event, int | None]], deps: ProjectorDeps
) -> list[BaseException | None]:
    """Apply events in one transaction; if it fails, each in its own (`handle`). Per event
    what its own fold raised, or None."""
    if len(entries) > 1:
        try:
            with Session(deps.engine) as session:
                apply_many(session, entries, ROLE)
            return [None] * len(entries)
        except Exception as exc:
            log.info("folding %d events together failed (%r); one by one", len(entries), exc)
    outcomes: list[BaseException | None] = []
    for event, seq in entries:
        try:
            handle(event, deps, seq)
            outcomes.append(None)
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


class Batches:
    """Gathers the events handed in while a fold runs, and folds them together next, in a
    worker thread (blocking SQL there, so the consumer loop keeps acking and heartbeating)."""

    def __init__(self, deps: ProjectorDeps):
        self.deps = deps
        self._waiting: list[tuple[Event, int | None, asyncio.Future[None]]] = []
        self._folding: asyncio.Task[None] | None = None

    async def fold(self, event: Event, seq: int | None) -> None:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((event, seq, done))
        if self._folding is None or self._folding.done():
            self._folding = asyncio.create_task(self._fold_waiting())
        await done

    async def _fold_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                entries = [(event, seq) for event, seq, _ in batch]
                outcomes = await asyncio.to_thread(handle_batch, entries, self.deps)
            except asyncio.CancelledError:  # shutting down: unacked, so delivered again
                for _, _, done in batch + self._waiting:
                    done.cancel()
                self._waiting = []
                raise
            for (_, _, done), outcome in zip(batch, outcomes, strict=True):
                if done.done():
                    continue  # its handler was cancelled
                if outcome is None:
                    done.set_result(None)
                else:
                    done.set_exception(outcome)


@dataclass(frozen=True)
class ProjectorDeps:
    engine: Engine
    log_index: LogIndex | None = None  # does an event fit its search's log?
    batches: Batches = field(init=False, compare=False, repr=False)  # what arrives together

    def __post_init__(self) -> None:
        object.__setattr__(self, "batches", Batches(self))


async def on_event(event: Event, delivery: Delivery, deps: ProjectorDeps) -> list[Event]:
    seq = delivery.msg.metadata.sequence.stream if delivery.msg is not None else None
    if deps.log_index is not None and seq is not None:
        if (why := await deps.log_index.refusal(event, seq)) is not None:
            raise Reject(f"not projected: {why}")
    await deps.batches.fold(event, seq)
    return []


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
    concurrency=CONCURRENCY,
    history=True,
    dedupe=False,
)


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Project the bus until `stop` is set."""
    await run_role(PROJECTOR, settings, stop or asyncio.Event())
