"""Reading the log in bulk: replay in stream order, every entry with the garbage shown, a
range of one subject's entries, and the dead-letter and quarantine streams. Every entry goes
through `Bus.read`, the one decoding. A role that needs a search's log per delivered event
follows it instead (`groundloop.log_follower`), reading each entry once.

Bulk reads go through a temporary push consumer (`_delivered`): the broker streams the entries
to an inbox of this connection, paced by flow control, and the reader takes them from a queue
without a request or a timer per entry (nats-py's pull `fetch` cost ~50 us of CPU per entry,
the push delivery ~15). What a read covers is fixed when it starts: up to the last entry on
its filter then (`_last_seq_on`); entries published later are not read, and entries deleted
or purged meanwhile end it early rather than being waited for. Entries are checked to come
in consumer order; one missing (a drop, a reconnect) or a consumer gone quiet is followed by
a new consumer from the first entry not yielded, so none is skipped or yielded twice.

Memory: the broker holds back deliveries while a flow-control window of un-answered bytes is
out, and the reader answers a flow-control request only once its caller has taken every entry
delivered before it (never on the broker's "stalled" heartbeat alone, which nats-py's own push
subscriptions answer at once, letting a slow caller's queue grow by a window per heartbeat).
The window starts at 2 MiB and doubles with each answer up to nats-server's 32 MiB
(JsFlowControlMaxPending), so a read holds at most ~32 MiB of entries (~25,000 events of
1.2 KB) however slow its caller; nats-py's own subscription limits (128 MiB, 512k messages)
are never reached."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from nats.js import api
from nats.js.errors import NotFoundError

from groundloop.events import Event
from groundloop.quarantine import Quarantined

LOG_END = 2**63  # "the log as it is": past every stream sequence

HEARTBEAT_S = 1.0  # the consumer's idle heartbeat: how soon a reader learns the rest is gone
SILENT_S = 3 * HEARTBEAT_S  # waiting this long for an entry: the consumer is gone or stuck
REOPENS = 5  # consumers in a row that deliver nothing: the read gives up
INACTIVE_S = 60.0  # a reader that dies without deleting its consumer: the broker deletes it

if TYPE_CHECKING:
    from collections.abc import Mapping

    from nats.aio.msg import Msg

    from groundloop.settings import Settings


class ReplayStalled(RuntimeError):
    """The broker kept a read's consumer from delivering entries that are still stored."""


class PushDelivery:
    """What one push consumer delivered, checked to be in order, until the reader takes it;
    and the flow-control answer the broker waits for."""

    def __init__(self) -> None:
        self.ready: deque[Msg] = deque()
        self.arrived = asyncio.Event()
        self.received = 0  # consumer sequence of the last entry accepted
        self.taken = 0
        self.flow_reply: str | None = None  # answered once `taken` reaches `flow_after`
        self.flow_after = 0
        self.idle = False  # a heartbeat said the consumer has nothing more to deliver
        self.broken = False  # an entry went missing: the rest must come from a new consumer

    async def on_message(self, msg: Msg) -> None:
        """The subscription's callback; nothing here awaits, so a burst is queued at once."""
        reply = msg.reply
        if reply.startswith("$JS.ACK."):  # an entry (ack policy none: the reply is metadata)
            if self.broken:
                return
            if msg.metadata.sequence.consumer == self.received + 1:
                self.received += 1
                self.ready.append(msg)
            else:  # dropped by the client (a slow subscription) or never sent
                self.broken = True
        elif reply:  # a flow-control request, after the entry `received`
            self.flow_reply, self.flow_after = reply, self.received
        else:  # an idle heartbeat
            headers = msg.headers or {}
            stalled = headers.get(api.Header.CONSUMER_STALLED)
            if stalled:  # still waiting for the answer: given when the reader gets there
                self.flow_reply, self.flow_after = stalled, self.received
            elif int(headers.get(api.Header.LAST_CONSUMER, "0")) != self.received:
                self.broken = True
            else:
                self.idle = True
        self.arrived.set()

    async def answer_flow_control(self, nc: Any) -> None:
        if self.flow_reply is not None and self.taken >= self.flow_after:
            reply, self.flow_reply = self.flow_reply, None
            await nc.publish(reply)

    async def take(self, nc: Any) -> Msg:
        """The next entry (`ready` must hold one); the flow-control answer the broker waits
        for goes as soon as every entry delivered before it is taken."""
        msg = self.ready.popleft()
        self.taken += 1
        if self.flow_reply is not None:
            await self.answer_flow_control(nc)
        return msg

    async def wait(self, nc: Any, deadline: float) -> bool:
        """With nothing ready: answer the flow control owed, then wait for the next delivery
        (an entry, a heartbeat, a flow-control request) until `deadline` (the loop's clock);
        False when nothing came by then."""
        await self.answer_flow_control(nc)
        self.arrived.clear()
        try:
            async with asyncio.timeout_at(deadline):
                await self.arrived.wait()
        except TimeoutError:
            return False
        return True


class LogReading:
    """Mixed into `Bus`; every method reads through the bus's connection and `read`."""

    settings: Settings
    nc: Any
    js: Any

    # What `Bus` provides (declared here for the type checker; Bus defines them).
    async def read(
        self, subject: str, data: bytes, seq: int, headers: Mapping[str, str] | None = None
    ) -> Event | Quarantined:
        raise NotImplementedError

    def subject_filter(self, *, search_id: str = "*", type: str = "*", key: str = ">") -> str:
        raise NotImplementedError

    def dead_letter_subject(self, role: str) -> str:
        raise NotImplementedError

    @property
    def quarantine_stream(self) -> str:
        raise NotImplementedError

    async def events(
        self, search_id: str | None = None, batch: int = 1000
    ) -> AsyncGenerator[Event, None]:
        """Replay the log in publish order (one search, or all) up to its current end."""
        async with contextlib.aclosing(self.raw_events(search_id, batch)) as pairs:
            async for _seq, event in pairs:
                yield event

    async def raw_events(
        self, search_id: str | None = None, batch: int = 1000
    ) -> AsyncGenerator[tuple[int, Event], None]:
        """(stream seq, event) in publish order; quarantined entries are skipped."""
        async with contextlib.aclosing(self.entries(search_id, batch)) as entries:
            async for seq, entry in entries:
                if not isinstance(entry, Quarantined):
                    yield seq, entry

    async def entries(
        self, search_id: str | None = None, batch: int = 1000
    ) -> AsyncGenerator[tuple[int, Event | Quarantined], None]:
        """Every entry up to the log's current end, read through `read`: for readers that
        show garbage (`events tail`) rather than skip it."""
        async with contextlib.aclosing(self.stored_messages(search_id, batch)) as messages:
            async for msg in messages:
                seq = msg.metadata.sequence.stream
                yield seq, await self.read(msg.subject, msg.data, seq, msg.headers or {})

    async def stored_messages(
        self, search_id: str | None = None, batch: int = 1000
    ) -> AsyncGenerator[Any, None]:
        """The stored messages themselves (subject, headers, data, metadata), undecoded, up
        to the log's end as the call starts: for `entries`, and for archives, which keep the
        bytes. `batch` (how many a caller takes at a time) no longer sizes the reads: the
        broker's flow control paces them (see the module's docstring)."""
        subject = self.subject_filter(search_id=search_id or "*")
        last = await self._last_seq_on(subject)
        if last:
            async with contextlib.aclosing(self._delivered(subject, 1, last)) as messages:
                async for msg in messages:
                    yield msg

    async def read_range(
        self, subject: str, start: int = 1, before: int = LOG_END
    ) -> list[tuple[int, Event | Quarantined]]:
        """Entries on `subject` (a filter) from stream sequence `start` up to, not including,
        `before` (or the log's current end), each read through `read`."""
        start = max(start, 1)
        last = min(before - 1, await self._last_seq_on(subject))
        out: list[tuple[int, Event | Quarantined]] = []
        if last < start:
            return out
        async with contextlib.aclosing(self._delivered(subject, start, last)) as messages:
            async for msg in messages:
                seq = msg.metadata.sequence.stream
                out.append((seq, await self.read(msg.subject, msg.data, seq, msg.headers or {})))
        return out

    async def _last_seq_on(self, subject: str) -> int:
        """Stream sequence of the last entry on `subject` (a filter) now; 0: none."""
        try:
            return (await self.js.get_last_msg(self.settings.stream, subject)).seq or 0
        except NotFoundError:
            return 0

    async def _first_seq_on(self, subject: str, start: int) -> int:
        """Stream sequence of the first entry on `subject` at or after `start`; 0: none."""
        try:
            found = await self.js.get_msg(self.settings.stream, start, subject, next=True)
            return found.seq or 0
        except NotFoundError:
            return 0

    async def _delivered(self, subject: str, start: int, last: int) -> AsyncGenerator[Msg, None]:
        """Every stored message on `subject` from stream sequence `start` through `last`, in
        stream order, each once. A consumer that misses an entry or falls silent is replaced
        by one starting after the last entry yielded; the read ends early when the consumer
        says it has nothing more (the rest was deleted or purged). The consumer is deleted
        when the read ends, also when the caller stops early (the generator's close)."""
        loop = asyncio.get_running_loop()
        position, fruitless = start, 0
        while position <= last:
            if fruitless >= REOPENS:
                raise ReplayStalled(
                    f"{REOPENS} consumers on {subject} in a row delivered nothing from stream "
                    f"sequence {position} (of {start}..{last}) within {SILENT_S:.0f} s"
                )
            fruitless += 1
            delivery = PushDelivery()
            sub, consumer = await self.open_push(subject, position, delivery)
            deadline, taken_by_deadline = loop.time() + SILENT_S, 0
            try:
                while True:
                    if delivery.ready:
                        msg = await delivery.take(self.nc)
                        seq = msg.metadata.sequence.stream
                        if seq > last:
                            return
                        if seq < position:  # never expected: a consumer starts at `position`
                            continue
                        position, fruitless = seq + 1, 0
                        yield msg
                        if position > last:
                            return
                        continue
                    if delivery.broken:
                        break
                    if delivery.idle:  # nothing more on the consumer: deleted meanwhile?
                        if not position <= await self._first_seq_on(subject, position) <= last:
                            return
                        break  # there is: it was not delivered, a new consumer reads it
                    if delivery.taken != taken_by_deadline:  # heartbeats do not move it
                        deadline, taken_by_deadline = loop.time() + SILENT_S, delivery.taken
                    if not await delivery.wait(self.nc, deadline):
                        break
            finally:
                await self.close_push(sub, consumer)

    async def open_push(
        self, subject: str, start: int, delivery: PushDelivery, **limits: int
    ) -> tuple[Any, str]:
        """An ephemeral push consumer on `subject` from stream sequence `start`, delivering to
        a new inbox of this connection that feeds `delivery` (subscribed first, so nothing is
        delivered before anyone listens). `limits`: the subscription's pending_msgs_limit /
        pending_bytes_limit (a log follower's; nats-py's defaults otherwise)."""
        sub = await self.nc.subscribe(self.nc.new_inbox(), cb=delivery.on_message, **limits)
        try:
            info = await self.js.add_consumer(
                self.settings.stream,
                config=api.ConsumerConfig(
                    deliver_subject=sub.subject,
                    filter_subject=subject,
                    deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=start,
                    ack_policy=api.AckPolicy.NONE,  # no acks: roles may not ack ephemerals
                    flow_control=True,
                    idle_heartbeat=HEARTBEAT_S,
                    inactive_threshold=INACTIVE_S,
                    mem_storage=True,  # as nats-py's ordered consumers: state is the reader's
                    num_replicas=1,
                ),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            raise
        return sub, info.name

    async def close_push(self, sub: Any, consumer: str) -> None:
        """Unsubscribed first, so a close cut short (a cancelled caller) leaves no listener and
        the broker deletes the consumer after INACTIVE_S; then deleted at once: left to
        expire, every read would hold one of the stream's 1,000 consumers for a minute, and a
        role reading per event (the rl-trainer, the ideator) reached the cap."""
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if self.nc.is_connected:  # else it expires unheard: no request to wait out unanswered
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(self.settings.stream, consumer)

    async def stream_state(self) -> dict[str, int]:
        info = await self.js.stream_info(self.settings.stream)
        return {"messages": info.state.messages, "last_seq": info.state.last_seq}

    async def dead_letters(self, role: str) -> list[tuple[dict[str, str], bytes]]:
        """All dead letters of one role (for tests and `groundloop events dead-letters`)."""
        subject = self.dead_letter_subject(role)
        return [
            (headers, body)
            for msg_subject, headers, body in await self._stored(self.settings.dlq_stream)
            if msg_subject == subject
        ]

    async def quarantined(self) -> list[Quarantined]:
        """Every quarantined log entry, in the order they were first read."""
        return [
            Quarantined(
                int(headers.get("Groundloop-Stream-Seq", "0")),
                headers.get("Groundloop-Subject", ""),
                headers.get("Groundloop-Reason", ""),
                body,
            )
            for _subject, headers, body in await self._stored(self.quarantine_stream)
        ]

    async def _stored(self, stream: str) -> list[tuple[str, dict[str, str], bytes]]:
        out: list[tuple[str, dict[str, str], bytes]] = []
        info = await self.js.stream_info(stream)
        if info.state.messages == 0:
            return out
        for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
            try:
                msg = await self.js.get_msg(stream, seq)
            except NotFoundError:
                continue
            out.append((msg.subject, dict(msg.headers or {}), msg.data or b""))
        return out
