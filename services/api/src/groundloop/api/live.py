"""The dashboard's live feed: server-sent events straight off the log.

`GET /live` (optionally `?search_id=…`) follows the stream with a JetStream ordered consumer
(ephemeral, no acks, in stream order, reset by the client library after a gap) on the
search's subjects, decodes every entry through `Bus.read` (the one decoding path), and sends
one SSE message per entry. The page then re-reads the JSON endpoints, so before sending an
event the feed waits (briefly) until the projector has folded it: what the page fetches next
already contains it. Each message's SSE id is the stream sequence; a browser that reconnects
sends it back as Last-Event-ID and the feed resumes right after it, missing nothing.

The broker connection (`BrokerLink`) is opened on first use and shared by every request of
the app: the live feed, run logs and large diffs from the object store.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from pydantic import BaseModel
from sqlalchemy import Engine
from sqlmodel import Session

from groundloop.api.projector import ROLE as PROJECTOR_ROLE
from groundloop.api.store import ProcessedEvent
from groundloop.bus import BrokerUnavailable, Bus
from groundloop.events import SEARCH_ID_PATTERN, Event
from groundloop.quarantine import Quarantined
from groundloop.settings import Settings

router = APIRouter(tags=["live"])

HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
CLOSING_CHECK_S = 0.5  # how soon an open feed ends once the server is stopping
PROJECTION_WAIT_S = 3.0  # longest wait for the projector before sending an event anyway
PROJECTION_POLL_S = 0.03
# Fields worth showing in a live ticker; the page fetches the rest from the JSON endpoints.
SUMMARY_FIELDS = (
    "idea_id",
    "run_id",
    "patch_id",
    "generation",
    "mode",
    "title",
    "status",
    "purpose",
    "score",
    "reward",
    "policy_version",
    "step",
    "mean_reward",
    "max_reward",
    "reason",
)


READER_ADVICE = (
    "no broker configured: set GROUNDLOOP_NATS_URL (or start the dashboard with `groundloop "
    "ui`, which starts or reuses the embedded broker) to see live events, run logs and stored "
    "diffs"
)


class BrokerLink:
    """One broker connection of the app, opened on first use, closed with the app. The read
    side connects as "api" (the projector role: it may publish nothing); the write endpoints
    have a link of their own (routes_control)."""

    def __init__(self, settings: Settings, name: str = "api", advice: str = READER_ADVICE) -> None:
        self.settings = settings
        self.name = name
        self.advice = advice  # what a 503 says when no broker is configured
        self._bus: Bus | None = None
        self._lock = asyncio.Lock()

    async def bus(self) -> Bus:
        """The connected bus, or a 503 that says how to give the app a broker."""
        if not self.settings.nats_url:
            raise HTTPException(status_code=503, detail=self.advice)
        async with self._lock:
            if self._bus is None:
                try:
                    self._bus = await Bus.connect(self.settings, self.name)
                except BrokerUnavailable as exc:
                    raise HTTPException(status_code=503, detail=str(exc)) from None
            return self._bus

    async def close(self) -> None:
        if self._bus is not None:
            await self._bus.close()
            self._bus = None


class LiveMessage(BaseModel):
    """The JSON in each SSE `data:` line."""

    seq: int
    type: str  # the event type, or "Quarantined" for an entry that could not be decoded
    search_id: str | None
    event_id: str | None = None
    occurred_at: str | None = None
    producer: str | None = None
    projected: bool  # False: the projector had not folded it within PROJECTION_WAIT_S
    summary: dict[str, Any] = {}


def summarise(seq: int, entry: Event | Quarantined, projected: bool) -> LiveMessage:
    if isinstance(entry, Quarantined):
        parts = entry.subject.split(".")
        return LiveMessage(
            seq=seq,
            type="Quarantined",
            search_id=parts[1] if len(parts) > 1 else None,
            projected=projected,
            summary={"reason": entry.reason[:500]},
        )
    data = entry.model_dump(mode="json", include=set(SUMMARY_FIELDS))
    return LiveMessage(
        seq=seq,
        type=entry.type,  # type: ignore[attr-defined]
        search_id=entry.search_id,
        event_id=entry.event_id,
        occurred_at=entry.occurred_at.isoformat(),
        producer=entry.producer,
        projected=projected,
        summary={k: v for k, v in data.items() if v is not None},
    )


def _is_projected(engine: Engine, event_id: str) -> bool:
    with Session(engine) as session:
        return session.get(ProcessedEvent, (PROJECTOR_ROLE, event_id)) is not None


async def wait_projected(engine: Engine, event_id: str, timeout: float) -> bool:
    """True once the projector has folded `event_id`; False after `timeout` seconds (no
    projector is running, or it is far behind: the page shows the event and catches up)."""
    deadline = time.monotonic() + timeout
    while True:
        if await asyncio.to_thread(_is_projected, engine, event_id):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(PROJECTION_POLL_S)


def sse(message: LiveMessage) -> bytes:
    return f"id: {message.seq}\ndata: {message.model_dump_json()}\n\n".encode()


async def follow(
    bus: Bus,
    engine: Engine,
    search_id: str | None,
    after_seq: int | None,
    closing: Callable[[], bool] = lambda: False,
) -> AsyncIterator[bytes]:
    """SSE bytes for every log entry after `after_seq` (None: only new ones), until the
    client goes or `closing()` (the server is stopping: the browser reconnects elsewhere or
    later, resuming from its Last-Event-ID)."""
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.NEW
        if after_seq is None
        else api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=None if after_seq is None else after_seq + 1,
        inactive_threshold=60.0,  # the server drops it if this process vanishes
    )
    sub = await bus.js.subscribe(
        bus.subject_filter(search_id=search_id or "*"),
        stream=bus.settings.stream,
        ordered_consumer=True,
        config=config,
    )
    try:
        yield b": live\n\n"  # headers and a first byte now, so the browser marks it open
        quiet = 0.0
        while not closing():
            try:
                msg = await sub.next_msg(timeout=CLOSING_CHECK_S)
            except (TimeoutError, NatsTimeout):
                quiet += CLOSING_CHECK_S
                if quiet >= HEARTBEAT_S:
                    quiet = 0.0
                    yield b": keep-alive\n\n"
                continue
            quiet = 0.0
            seq = msg.metadata.sequence.stream
            entry = await bus.read(msg.subject, msg.data, seq, msg.headers or {})
            projected = isinstance(entry, Event) and await wait_projected(
                engine, entry.event_id, PROJECTION_WAIT_S
            )
            yield sse(summarise(seq, entry, projected))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


SearchFilter = Annotated[
    str | None,
    Query(
        pattern=SEARCH_ID_PATTERN,
        description="only this search's events (default: every search's)",
    ),
]


@router.get(
    "/live",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "text/event-stream: one message per log entry, `id` = stream "
            "sequence, `data` = LiveMessage JSON; `: keep-alive` comments every 15 s",
            "content": {"text/event-stream": {"schema": LiveMessage.model_json_schema()}},
        },
        503: {"description": "no broker configured or reachable"},
    },
)
async def live(
    request: Request,
    search_id: SearchFilter = None,
    since: Annotated[
        int | None, Query(ge=0, description="resume after this stream sequence")
    ] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-sent events of the log as it grows: new runs, ideas, generations within a
    second of their event, each sent once the projections include it."""
    bus = await request.app.state.broker.bus()
    resume = since
    if resume is None and last_event_id and re.fullmatch(r"\d+", last_event_id):
        resume = int(last_event_id)
    return StreamingResponse(
        follow(
            bus,
            request.app.state.engine,
            search_id,
            resume,
            closing=lambda: request.app.state.closing,
        ),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
