"""Exactly one event per guarded subject, and no stray message can take its place.

Some events exist once per subject: GenerationAdvanced per generation, IdeasShortfall per
generation (`producers.ONE_PER_SUBJECT`). They are published expecting the subject to be
empty (`Nats-Expected-Last-Subject-Sequence: 0`), which makes the broker the arbiter between
replicas. Alone, that guard can be turned against the system: one message published on a
generation's subject ahead of the evolver (garbage, an event of another type, an event
claiming another producer) made the broker refuse the real GenerationAdvanced forever, and
the search never went on.

So a refusal is not taken at its word. `publish_event` then reads the subject: if it holds
"the one" (a valid event of the guarded type from the producer the type requires, read
through `Bus.read`, so garbage is quarantined on the way), the refusal stands; if not, it
publishes again expecting the subject's last sequence as just read. That is still atomic: a
replica that published meanwhile makes the broker refuse again, and the subject is re-read.
Readers apply the same rule (`refusal`): the first valid event of the right producer on the
subject is the one, anything before it never counted and anything after it is refused.
"""

from __future__ import annotations

import asyncio
import logging

from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, NoStreamResponseError

from groundloop import events as ev
from groundloop import telemetry
from groundloop.bus import WRONG_LAST_SEQUENCE, BrokerUnavailable, Bus, Published
from groundloop.producers import ONE_PER_SUBJECT, writes_guarded
from groundloop.quarantine import Quarantined
from groundloop.search_index import Entry, read_entries

log = logging.getLogger(__name__)

RACES = 20  # re-reads after losing to another writer; each loss means the subject grew
_TRANSIENT = (NatsTimeout, asyncio.TimeoutError, NoStreamResponseError, OSError)


def is_guarded(event: ev.Event) -> bool:
    return event.TYPE in ONE_PER_SUBJECT


def is_the_one(entry: ev.Event | Quarantined, kind: str) -> bool:
    """A valid event of guarded type `kind` written by the producer `kind` requires (or a
    copy of one, by fork or import)."""
    return isinstance(entry, ev.Event) and entry.TYPE == kind and writes_guarded(entry)


def the_one(entries: list[Entry], kind: str) -> tuple[int, ev.Event] | None:
    for seq, entry in entries:
        if isinstance(entry, ev.Event) and is_the_one(entry, kind):
            return seq, entry
    return None


async def publish_event(bus: Bus, event: ev.Event, *, retry_for: float = 60.0) -> Published:
    """Publish `event`; a guarded one exactly once per subject. `refused` means the subject
    already has its one event, another than this; `duplicate` that it is this very event."""
    if not is_guarded(event):
        return await bus.publish(event, retry_for=retry_for)
    published = await bus.publish(event, once_per_subject=True, retry_for=retry_for)
    subject = bus.subject_of(event)
    for _ in range(RACES):
        if not published.refused:
            return published
        entries = await read_entries(bus, subject)
        found = the_one(entries, event.TYPE)
        if found is not None:
            seq, one = found
            same = one.event_id == event.event_id
            return Published(seq=seq, duplicate=same, refused=not same)
        last = entries[-1][0] if entries else 0
        log.warning(
            "%s: %d message(s) on %s, none a valid %s of the %s: publishing after stream seq %d",
            event.event_id,
            len(entries),
            subject,
            event.TYPE,
            ONE_PER_SUBJECT[event.TYPE],
            last,
        )
        published = await _publish_after(bus, subject, event, last, retry_for)
    raise BrokerUnavailable(
        f"{event.TYPE} {event.event_id}: {subject} kept growing through {RACES} attempts to "
        "publish after its last message; something is flooding the subject"
    )


async def refusal(bus: Bus, event: ev.Event, seq: int) -> str | None:
    """Why a reader must not take the guarded `event` stored at `seq` as its subject's one
    event; None when it is the one (or not a guarded type)."""
    if not is_guarded(event):
        return None
    if not writes_guarded(event):
        producer = ONE_PER_SUBJECT[event.TYPE]
        return f"a {event.TYPE} by {event.producer!r}: only the {producer} writes it"
    subject = bus.subject_of(event)
    earlier = the_one(await read_entries(bus, subject, before=seq), event.TYPE)
    if earlier is not None:
        return (
            f"a second {event.TYPE} on {subject}: the first valid one, stream seq "
            f"{earlier[0]} (event {earlier[1].event_id}), is the one"
        )
    return None


async def _publish_after(
    bus: Bus, subject: str, event: ev.Event, last: int, retry_for: float
) -> Published:
    headers = {"Nats-Msg-Id": event.event_id, "Nats-Expected-Last-Subject-Sequence": str(last)}
    telemetry.inject(headers, event)
    body = ev.encode(event)
    if bus.signer is not None:  # signed as `Bus.publish` signs, or readers would refuse it
        headers.update(bus.signer.headers(subject, body))
    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + retry_for, 0.1
    while True:
        try:
            ack = await bus.js.publish(subject, body, headers=headers)
            return Published(seq=ack.seq, duplicate=bool(ack.duplicate))
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return Published(seq=0, refused=True)
            if exc.code and exc.code < 500:
                raise
            failure: Exception = exc
        except _TRANSIENT as exc:
            failure = exc
        if loop.time() + delay > deadline:
            raise BrokerUnavailable(
                f"publish to {subject} failed for {retry_for:.0f}s: {failure!r}"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
