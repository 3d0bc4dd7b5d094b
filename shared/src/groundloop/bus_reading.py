"""Reading the log in bulk: replay in stream order, every entry with the garbage shown, a
range of one subject's entries, and the dead-letter and quarantine streams. Every entry goes
through `Bus.read`, the one decoding; every temporary consumer is deleted after use (`reader`).
A role that needs a search's log per delivered event follows it instead
(`groundloop.log_follower`), reading each entry once."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import NotFoundError

from groundloop.events import Event
from groundloop.quarantine import Quarantined

LOG_END = 2**63  # "the log as it is": past every stream sequence

if TYPE_CHECKING:
    from collections.abc import Mapping

    from groundloop.settings import Settings


class LogReading:
    """Mixed into `Bus`; every method reads through the bus's connection and `read`."""

    settings: Settings
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

    async def events(self, search_id: str | None = None, batch: int = 1000) -> AsyncIterator[Event]:
        """Replay the log in publish order (one search, or all) up to its current end."""
        async for _seq, event in self.raw_events(search_id, batch):
            yield event

    async def raw_events(
        self, search_id: str | None = None, batch: int = 1000
    ) -> AsyncIterator[tuple[int, Event]]:
        """(stream seq, event) in publish order; quarantined entries are skipped."""
        async for seq, entry in self.entries(search_id, batch):
            if not isinstance(entry, Quarantined):
                yield seq, entry

    async def entries(
        self, search_id: str | None = None, batch: int = 1000
    ) -> AsyncIterator[tuple[int, Event | Quarantined]]:
        """Every entry up to the log's current end, read through `read`: for readers that
        show garbage (`events tail`) rather than skip it."""
        async for msg in self.stored_messages(search_id, batch):
            seq = msg.metadata.sequence.stream
            yield seq, await self.read(msg.subject, msg.data, seq, msg.headers or {})

    async def stored_messages(
        self, search_id: str | None = None, batch: int = 1000
    ) -> AsyncIterator[Any]:
        """The stored messages themselves (subject, headers, data, metadata), undecoded, up
        to the log's current end: for `entries`, and for archives, which keep the bytes."""
        subject = self.subject_filter(search_id=search_id or "*")
        async with self.reader(subject) as sub:
            pending = (await sub.consumer_info()).num_pending
            while pending > 0:
                try:
                    msgs = await sub.fetch(min(batch, pending), timeout=5.0)
                except (TimeoutError, NatsTimeout):
                    continue
                for msg in msgs:
                    pending = msg.metadata.num_pending
                    yield msg

    async def read_range(
        self, subject: str, start: int = 1, before: int = LOG_END
    ) -> list[tuple[int, Event | Quarantined]]:
        """Entries on `subject` (a filter) from stream sequence `start` up to, not including,
        `before` (or the log's current end), each read through `read`."""
        out: list[tuple[int, Event | Quarantined]] = []
        async with self.reader(subject, start) as sub:
            pending, empty_fetches = (await sub.consumer_info()).num_pending, 0
            while pending > 0 and empty_fetches < 5:
                try:
                    msgs = await sub.fetch(min(500, pending), timeout=2.0)
                except (TimeoutError, NatsTimeout):
                    empty_fetches += 1  # counted as pending, then deleted: do not wait forever
                    continue
                for msg in msgs:
                    pending, seq = msg.metadata.num_pending, msg.metadata.sequence.stream
                    if seq >= before:
                        return out
                    out.append(
                        (seq, await self.read(msg.subject, msg.data, seq, msg.headers or {}))
                    )
        return out

    @contextlib.asynccontextmanager
    async def reader(self, subject: str, start: int = 1) -> AsyncIterator[Any]:
        """A temporary pull subscription on the log from sequence `start`, deleted on exit:
        left to expire, every read would hold one of the stream's 1,000 consumers for a
        minute, and a role reading per event (the rl-trainer, the ideator) reached the cap."""
        sub = await self.js.pull_subscribe(
            subject,
            stream=self.settings.stream,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.NONE,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=max(start, 1),
                inactive_threshold=60.0,  # a reader that dies without deleting it
                max_waiting=1,
            ),
        )
        try:
            yield sub
        finally:
            with contextlib.suppress(Exception):  # best effort: it expires anyway
                name = (await sub.consumer_info()).name
                await self.js.delete_consumer(self.settings.stream, name)
            await sub.unsubscribe()

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
