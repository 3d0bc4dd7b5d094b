"""The one service skeleton: each role declares what it is; the wiring is written once, here.

A role is its name (durable consumer and producer), the event types it consumes, how to
build its per-process dependencies from the settings and the bus, and its handler:

    ROLE = Role(name="ideator", consumes=(GenerationAdvanced,), deps=ideator_context,
                handle=on_generation, concurrency=2)

    await run_role(ROLE, settings, stop)       # connect, build deps, consume until `stop`, close
    serve("ideator", lambda settings: ROLE)    # a service's __main__: settings → logging and
                                               # tracing → SIGTERM/SIGINT → run_role

`deps(settings, bus, stop)` is an async context manager: whatever a role needs before its
first event (a rebuild from the log, a worker pool, a database engine) is set up on entry
and released on exit, and a background task (the evolver's deadline ticker) lives inside it.
Every handled event is traced (groundloop.telemetry): the consumer's span carries the event's
ids and the role, and an output that begins work of its own (IdeaProposed, GenerationAdvanced,
RunRequested) is published with a trace of its own. `serve` flushes the spans on exit.
`serve(..., beside=[...])` runs other parts of the process (the api's HTTP server) next to
the role; when any part ends, the others are asked to stop.

The handler returns the events to publish, or raises: `Retry` (try again later) or
`Reject` (never) from groundloop.consumer, or a domain error subclassing one of them, and
`consume` decides the acknowledgement from that kind. A Retry on the last allowed delivery
of a role without `on_exhausted` becomes a Reject: nothing would ever redeliver it, and the
dead-letter then keeps the real reason rather than "exhausted".
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from groundloop import telemetry
from groundloop.bus import Bus
from groundloop.consumer import Delivery, ExhaustedHandler, Reject, Retry, consume
from groundloop.events import Event
from groundloop.settings import Settings
from groundloop.telemetry import configure_logging, configure_tracing

log = logging.getLogger(__name__)

D = TypeVar("D")

# settings, the role's bus connection, the stop event -> its dependencies for the process
DepsFactory = Callable[[Settings, Bus, asyncio.Event], AbstractAsyncContextManager[D]]
RoleHandler = Callable[[Event, Delivery, D], Awaitable[list[Event]]]
# Another part of the process run beside the role; returns once `stop` is set.
Companion = Callable[[Settings, asyncio.Event], Awaitable[None]]


@dataclass(frozen=True)
class Role(Generic[D]):
    name: str  # the durable consumer shared by replicas (and the producer of its events)
    consumes: tuple[type[Event], ...]  # () = every event of every search
    deps: DepsFactory[D]
    handle: RoleHandler[D]
    key: str = ">"  # subject key filter, e.g. a runner's resource class
    connection: str | None = None  # NATS client name when replicas differ (default: name)
    concurrency: int = 1
    history: bool = False  # handle events copied by fork/import (roles that fold state)
    dedupe: bool = True  # False: the handler records processed events itself
    on_exhausted: ExhaustedHandler | None = None

    def filters(self, bus: Bus) -> list[str]:
        if not self.consumes:
            return [bus.subject_filter()]
        return [bus.subject_filter(type=cls.TYPE, key=self.key) for cls in self.consumes]


async def run_role(role: Role[Any], settings: Settings, stop: asyncio.Event) -> None:
    """Serve `role` on the bus until `stop` is set; returns once the work in hand is done."""
    bus = await Bus.connect(settings, role.connection or role.name)
    try:
        async with role.deps(settings, bus, stop) as deps:

            async def handler(event: Event, delivery: Delivery) -> list[Event]:
                # Inside the consumer's span: name its ids; outputs that begin work of their
                # own (an idea, a generation) each get their own trace (groundloop.telemetry).
                with telemetry.handling(role.name, event) as handling:
                    try:
                        outputs = await role.handle(event, delivery, deps)
                    except Retry as exc:
                        if delivery.last_attempt and role.on_exhausted is None:
                            raise Reject(f"{exc.reason} (still so on the last delivery)") from exc
                        raise
                    handling.emitted(outputs)
                    return outputs

            filters = role.filters(bus)
            log.info("%s: consuming %s (concurrency %d)", role.name, filters, role.concurrency)
            await consume(
                bus,
                role.name,
                filters,
                handler,
                stop=stop,
                concurrency=role.concurrency,
                on_exhausted=role.on_exhausted,
                history=role.history,
                dedupe=role.dedupe,
            )
    finally:
        await bus.close()


def serve(
    name: str,
    role: Callable[[Settings], Role[Any]] | None,
    *,
    beside: Sequence[Companion] = (),
) -> None:
    """The body of a service's `__main__`: settings from GROUNDLOOP_* variables, logging and
    tracing as `name`, then the role (built from the settings) and any companions until
    SIGTERM or SIGINT. `role=None` runs the companions alone."""
    settings = Settings()
    configure_logging(settings)
    try:
        configure_tracing(settings, name)
    except ValueError as exc:  # a GROUNDLOOP_TRACES this process cannot honour
        raise SystemExit(f"{name}: {exc}") from None
    parts = list(beside)
    if role is not None:
        make_role = role
        parts.insert(0, lambda s, stop: run_role(make_role(s), s, stop))
    try:
        asyncio.run(_until_signalled(settings, parts))
    finally:
        telemetry.shutdown_tracing()  # export the spans still batched: the last events' work


async def _until_signalled(settings: Settings, parts: list[Companion]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def part(run: Companion) -> None:
        try:
            await run(settings, stop)
        finally:
            stop.set()  # one part ending (or failing) stops the whole process

    await asyncio.gather(*(part(p) for p in parts))
