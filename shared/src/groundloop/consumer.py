"""The one main loop every service runs: a durable pull consumer shared by a role's replicas.

fetch (only while a handler slot is free) → `Bus.read` (not a valid event → quarantined once,
terminated, dead-lettered for this role) →
already processed by this role? ack → handle → publish outputs (deterministic ids) → record
processed → ack. Outcomes decide the acknowledgement:

    handler returns       publish its events, ack
    raise Retry           nak with the given delay (redelivered, maybe to another replica)
    raise Reject          terminate, dead-letter with the reason
    any other exception   logged, nak with backoff; after max_deliver the server gives up
                          and `on_exhausted` records the loss (e.g. a failed RunCompleted)

A replica that dies mid-handler never acks, so the message is redelivered after ack_wait;
long handlers keep it by sending in-progress acks (`Delivery.heartbeat`).

`concurrency` bounds the deliveries a replica holds. A handler whose scarce resource is free
before its work ends (a runner's slot, once the run's process has exited) gives its share back
with `Delivery.release()`, so the next message is fetched while the rest (log upload,
publishing, the ack) finishes.

Events copied into a search by `fork` or `import` carry a producer starting with "history:".
They are facts, not work: only roles that fold state (projector, evolver) pass
`history=True`; the others ack them without handling, so no copied patch is run again.

A guarded event (one per subject: GenerationAdvanced, IdeasShortfall) reaches the handler
only if it is its subject's one event (groundloop.guarded_publish): one by another producer,
or a second after the one, is quarantined and dead-lettered like garbage. Outputs are
published through `publish_event`, which keeps that guard from being blocked by strays.

Dead letters: one record per role and message (message id `dead-letter.<role>.<stream seq>`);
the original's `Nats-*` headers are never copied, or its message id would make the
dead-letter stream keep one record for all the roles that dead-letter the same message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import BadRequestError, NotFoundError

from groundloop import telemetry
from groundloop.bus import Bus, describe
from groundloop.events import Event
from groundloop.guarded_publish import publish_event
from groundloop.guarded_publish import refusal as guard_refusal
from groundloop.producers import HISTORY_PREFIX as HISTORY_PREFIX
from groundloop.producers import is_history as is_history
from groundloop.quarantine import Quarantined
from groundloop.search_index import record_refusal

log = logging.getLogger(__name__)


class Retry(Exception):
    """Hand the event back for redelivery after `delay` seconds."""

    def __init__(self, reason: str, delay: float = 1.0):
        super().__init__(reason)
        self.reason, self.delay = reason, delay


class Reject(Exception):
    """The event can never be handled: terminate it and keep it on the dead-letter subject."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Delivery:
    event: Event
    attempt: int
    max_deliver: int
    ack_wait: float
    msg: Any = field(repr=False, default=None)
    seq: int = 0  # the event's stream sequence: everything it depends on precedes it
    release: Callable[[], None] = field(repr=False, default=lambda: None)

    @property
    def last_attempt(self) -> bool:
        return self.attempt >= self.max_deliver

    async def in_progress(self) -> None:
        if self.msg is not None:
            with contextlib.suppress(Exception):  # a lost heartbeat only risks an early redelivery
                await self.msg.in_progress()

    @contextlib.asynccontextmanager
    async def heartbeat(self, every: float | None = None) -> AsyncIterator[None]:
        """Keep the message ours while a long handler runs (in-progress ack every ack_wait/3)."""
        period = every or max(self.ack_wait / 3, 0.1)

        async def beat() -> None:
            while True:
                await asyncio.sleep(period)
                await self.in_progress()

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


Handler = Callable[[Event, Delivery], Awaitable[list[Event]]]
ExhaustedHandler = Callable[[Event, str], Awaitable[list[Event]]]


async def ensure_consumer(bus: Bus, role: str, filters: list[str]) -> None:
    """Create or update the role's durable pull consumer (idempotent, safe across replicas)."""
    s = bus.settings
    config = api.ConsumerConfig(
        durable_name=role,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=s.ack_wait_s,
        max_deliver=s.max_deliver,
        max_ack_pending=10_000,
        max_waiting=512,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) != 1 else None,
    )
    try:
        await bus.js.consumer_info(s.stream, role)
    except NotFoundError:
        with contextlib.suppress(BadRequestError):  # another replica won the race
            await bus.js.add_consumer(s.stream, config)
            return
    await bus.js.add_consumer(s.stream, config)  # same name: updates the config in place


async def publish_outputs(bus: Bus, outputs: list[Event]) -> None:
    for out in outputs:
        # Guarded types (GenerationAdvanced, IdeasShortfall) are exactly-once per subject.
        result = await publish_event(bus, out)
        if result.refused:
            log.info("%s refused: its subject already has its one event", describe(out))


async def consume(
    bus: Bus,
    role: str,
    filters: list[str],
    handler: Handler,
    *,
    stop: asyncio.Event,
    concurrency: int = 1,
    on_exhausted: ExhaustedHandler | None = None,
    fetch_timeout: float = 1.0,
    history: bool = False,
    dedupe: bool = True,
) -> None:
    """Serve `role` until `stop` is set. `dedupe=False` skips the processed-events KV, for a
    role that records processed events itself in the same transaction as its effects."""
    await ensure_consumer(bus, role, filters)
    sub = await bus.js.pull_subscribe_bind(role, stream=bus.settings.stream)
    watcher = await _watch_exhausted(bus, role, on_exhausted)
    in_flight: set[asyncio.Task] = set()
    shares = _Shares()
    try:
        while not stop.is_set():
            free = concurrency - shares.held
            if free <= 0:
                await shares.wait_for_change()
                continue
            try:
                msgs = await sub.fetch(free, timeout=fetch_timeout)
            except (TimeoutError, NatsTimeout):
                continue
            except Exception as exc:  # broker restarting: keep the loop alive
                log.warning("%s: fetch failed (%r); retrying", role, exc)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                release = shares.take()
                task = asyncio.create_task(
                    _process(bus, role, msg, handler, history, dedupe, release)
                )
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                task.add_done_callback(lambda _task, release=release: release())
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
    finally:
        if watcher is not None:
            with contextlib.suppress(Exception):
                await watcher.unsubscribe()
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


class _Shares:
    """How many deliveries hold a share of the consumer's concurrency; a share is given back
    once, by `Delivery.release()` or when its task ends, whichever comes first."""

    def __init__(self) -> None:
        self.held = 0
        self._changed = asyncio.Event()

    def take(self) -> Callable[[], None]:
        self.held += 1
        given_back = False

        def release() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self.held -= 1
                self._changed.set()

        return release

    async def wait_for_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()


async def _process(
    bus: Bus,
    role: str,
    msg: Any,
    handler: Handler,
    history: bool,
    dedupe: bool,
    release: Callable[[], None],
) -> None:
    headers = dict(msg.headers or {})
    meta = msg.metadata
    attempt, seq = meta.num_delivered, meta.sequence.stream
    event = await bus.read(msg.subject, msg.data, seq, msg.headers or {})
    if isinstance(event, Quarantined):
        log.error("%s: rejecting %s", role, event)
        await bus.dead_letter(role, msg.data, event.reason, letter_headers(headers, role, msg))
        await msg.term()
        return
    if (why := await guard_refusal(bus, event, seq)) is not None:
        log.error("%s: rejecting %s: %s", role, describe(event), why)
        await record_refusal(bus, seq, msg.subject, msg.data, why)
        await bus.dead_letter(role, msg.data, why, letter_headers(headers, role, msg))
        await msg.term()
        return
    if (not history and is_history(event)) or (
        dedupe and await bus.was_processed(role, event.event_id)
    ):
        log.debug("%s: %s is history or already processed; acking", role, describe(event))
        await msg.ack()
        return
    delivery = Delivery(
        event, attempt, bus.settings.max_deliver, bus.settings.ack_wait_s, msg, seq, release
    )
    with telemetry.span_from_headers(
        f"{role} {event.TYPE}",
        headers,
        event_id=event.event_id,
        search_id=event.search_id,
        attempt=attempt,
    ):
        try:
            outputs = await handler(event, delivery)
            await publish_outputs(bus, outputs)
        except Retry as exc:
            log.info(
                "%s: %s handed back (%s); retry in %.1fs",
                role,
                describe(event),
                exc.reason,
                exc.delay,
            )
            await msg.nak(delay=exc.delay)
            return
        except Reject as exc:
            log.error("%s: %s rejected: %s", role, describe(event), exc.reason)
            await bus.dead_letter(role, msg.data, exc.reason, letter_headers(headers, role, msg))
            await msg.term()
            return
        except Exception:
            delay = min(2.0**attempt, 30.0)
            log.exception(
                "%s: handling %s failed (attempt %d/%d); retry in %.0fs",
                role,
                describe(event),
                attempt,
                bus.settings.max_deliver,
                delay,
            )
            await msg.nak(delay=delay)
            return
    if dedupe:
        await bus.mark_processed(role, event.event_id)
    await msg.ack()


async def _watch_exhausted(bus: Bus, role: str, on_exhausted: ExhaustedHandler | None) -> Any:
    """Subscribe (as a queue group, so one replica reacts) to JetStream's max-deliveries
    advisory for this role; record the loss through `on_exhausted` and the dead-letter."""
    subject = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{bus.settings.stream}.{role}"

    async def on_advisory(advisory: Any) -> None:
        try:
            seq = json.loads(advisory.data)["stream_seq"]
            stored = await bus.js.get_msg(bus.settings.stream, seq)
            event = await bus.read(
                stored.subject, stored.data or b"", seq, dict(stored.headers or {})
            )
        except Exception as exc:
            log.error("%s: cannot read exhausted message from advisory: %r", role, exc)
            return
        if isinstance(event, Quarantined):  # dead-lettered when it was first delivered
            return
        reason = f"no {role} finished it in {bus.settings.max_deliver} deliveries"
        log.error("%s: %s exhausted: %s", role, describe(event), reason)
        try:
            if on_exhausted is not None:
                await publish_outputs(bus, await on_exhausted(event, reason))
            await bus.dead_letter(
                role,
                stored.data,
                reason,
                {
                    "Nats-Msg-Id": f"dead-letter.{role}.{seq}",
                    "Groundloop-Subject": stored.subject,
                    "Groundloop-Stream-Seq": str(seq),
                },
            )
        except Exception:
            log.exception("%s: recording the exhausted %s failed", role, describe(event))

    return await bus.nc.subscribe(subject, queue=role, cb=on_advisory)


def letter_headers(original: dict[str, str], role: str, msg: Any) -> dict[str, str]:
    """Headers of `role`'s dead letter for `msg`: the original's own (trace context) without
    its `Nats-*` ones, whose message id or expected sequence would make the dead-letter stream
    drop the letter (keeping one per message for all roles), plus where the message was."""
    seq = msg.metadata.sequence.stream
    return {
        **{k: v for k, v in original.items() if not k.startswith("Nats-")},
        "Nats-Msg-Id": f"dead-letter.{role}.{seq}",  # one per role and message
        "Groundloop-Subject": msg.subject,
        "Groundloop-Stream-Seq": str(seq),
    }
