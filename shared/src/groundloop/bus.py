"""The bus: groundloop's connection to NATS JetStream, where the event log lives.

One stream holds every event of every search (file storage, no age limit: it is the log).
Subjects are `<prefix>.<search_id>.<EventType>.<key>` (see `Event.subject`), so
`<prefix>.<search>.>` replays one search and `<prefix>.*.PatchReady.gpu1` binds runners to one
resource class. Every publish carries `Nats-Msg-Id` = event_id, so a retried or re-derived
event is stored once within the duplicate window (Settings.duplicate_window_s; README
"Duplicates" says why two hours). A second stream holds dead letters, a third one record per
quarantined log entry (`groundloop.quarantine`); an object store holds run logs, large diffs
and checkpoints; a KV bucket records which events each role processed. Everything is created
idempotently by `Bus.connect`. Every reader decodes the log through `Bus.read`.

Identity: with credentials (Settings.nats_credentials_dir, or the embedded broker's) a process
logs in as the role of the name it connects with (`permissions.role_of`), the broker lets it
publish only that role's events, and every event it publishes is signed with the role's key
(`groundloop.identity`). `read` then quarantines unsigned, forged and misattributed events.
Without credentials (an existing broker without authentication) nothing is signed or
verified, and the process says so once in its log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nats
from nats.errors import (
    AuthorizationError,
    ConnectionClosedError,
    ConnectionReconnectingError,
    NoServersError,
)
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    NoStreamResponseError,
    NotFoundError,
)

from groundloop import bus_setup, identity, telemetry
from groundloop.bus_artifacts import WRONG_LAST_SEQUENCE as WRONG_LAST_SEQUENCE
from groundloop.bus_artifacts import ArtifactStore
from groundloop.bus_reading import LogReading
from groundloop.bus_setup import BrokerUnavailable as BrokerUnavailable
from groundloop.events import Event, encode
from groundloop.permissions import OPERATOR, ROLES, Names, inbox_prefix
from groundloop.quarantine import KEPT_BYTES, Quarantined, read_entry
from groundloop.quarantine import MAX_EVENT_BYTES as MAX_EVENT_BYTES
from groundloop.settings import Settings

log = logging.getLogger(__name__)

# How long one publish waits for its ack before sending again. A publish written to a node
# that has just died is lost without an answer; waiting the full API timeout (10 s) for it
# stalled every producer that long on a cluster failover. Resending is safe (Nats-Msg-Id).
PUBLISH_ATTEMPT_S = 2.0
_TRANSIENT = (
    NatsTimeout,
    asyncio.TimeoutError,
    NoStreamResponseError,
    ConnectionClosedError,
    OSError,
)


_said_unverified = {"once": False}


@dataclass(frozen=True)
class Published:
    seq: int
    duplicate: bool = False
    refused: bool = False  # once_per_subject and the subject already had a message


class Bus(LogReading, ArtifactStore):
    """A connection to the log; bulk reading (replay, entries, dead letters) is in
    `groundloop.bus_reading`."""

    def __init__(
        self,
        settings: Settings,
        nc: Any,
        *,
        role: str = OPERATOR,
        signer: identity.Signer | None = None,
        verifier: identity.Verifier | None = None,
    ):
        self.settings = settings
        self.names = Names.of(settings)
        self.nc = nc
        self.js = nc.jetstream(timeout=bus_setup.JS_TIMEOUT_S)
        self.role = role
        self.signer = signer
        self.verifier = verifier
        self._objects: Any = None
        self._processed: Any = None
        self._closing = {"now": False}  # shared with the disconnect callback: quiet on close
        self._recorded: set[int] = set()  # stream seqs this process already quarantined
        self._closers: list[Callable[[], Awaitable[None]]] = []  # run by `close`, first

    # ------------------------------------------------------------------ connect and ensure

    @classmethod
    async def connect(
        cls,
        settings: Settings,
        name: str,
        connect_timeout: float = 5.0,
        setup_tries: int = bus_setup.SETUP_TRIES,
    ) -> Bus:
        if not settings.nats_url:
            raise BrokerUnavailable(
                "no NATS URL: set GROUNDLOOP_NATS_URL, or use the CLI, which starts the embedded broker"
            )
        who = identity.of(settings, name)
        if who.verifier is None and not _said_unverified["once"]:
            _said_unverified["once"] = True
            log.warning(
                "events are not verified: no NATS credentials (GROUNDLOOP_NATS_CREDENTIALS_DIR) "
                "or GROUNDLOOP_VERIFY_EVENTS=false, so unsigned events from anyone are accepted"
            )
        auth: dict[str, Any] = {"nkeys_seed_str": who.seed.decode()} if who.seed else {}
        if who.tls is not None:
            auth["tls"] = who.tls

        closing = {"now": False}

        servers = settings.nats_servers()
        client: dict[str, Any] = {}  # the connection, for the callbacks to say which node

        def node() -> str:
            url = getattr(client.get("nc"), "connected_url", None)
            if url is not None:  # None while disconnected: then the last one known
                client["url"] = url.geturl()
            return client.get("url") or settings.nats_url or "?"

        async def on_disconnect() -> None:
            if not closing["now"]:
                log.warning("bus %s: disconnected from %s, reconnecting", name, node())

        async def on_reconnect() -> None:
            log.info("bus %s: reconnected to %s", name, node())

        errors: list[Exception] = []  # the first connect retries forever; these say why

        async def on_error(exc: Exception) -> None:
            errors.append(exc)
            log.debug("bus %s: %s", name, exc)

        try:
            # Unlimited reconnects also make nats-py retry the *first* connect forever, so the
            # first connect gets its own deadline.
            nc = await asyncio.wait_for(
                nats.connect(
                    servers,
                    # in the order given: the first is this process's preferred node, the
                    # rest (and the nodes the cluster announces) are where it fails over to
                    dont_randomize=True,
                    name=name,
                    connect_timeout=connect_timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,  # a broker restart must never strand a service
                    reconnect_time_wait=0.25,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    error_cb=on_error,
                    inbox_prefix=inbox_prefix(who.role),
                    **auth,
                ),
                timeout=connect_timeout * 2,
            )
        except (AuthorizationError, TimeoutError, NoServersError, OSError) as exc:
            refused = isinstance(exc, AuthorizationError) or any(
                isinstance(e, AuthorizationError) or "Authorization" in str(e) for e in errors
            )
            if not refused:
                why = f"; last error: {errors[-1]!r}" if errors else ""
                raise BrokerUnavailable(
                    f"cannot reach NATS at {settings.nats_url} ({exc.__class__.__name__}: "
                    f"{exc}{why}); start one (`groundloop broker`, or nats-server -js) or unset "
                    "GROUNDLOOP_NATS_URL to let the CLI start the embedded broker; a TLS broker "
                    "needs GROUNDLOOP_NATS_TLS_CA"
                ) from None
            held = f"the nkey of role {who.role}" if who.seed else "no credentials"
            raise BrokerUnavailable(
                f"NATS at {settings.nats_url} refused {name!r} with {held}: set "
                "GROUNDLOOP_NATS_CREDENTIALS_DIR to the folder holding this role's seed (and "
                "the server's config to its public key, deploy/nats/README.md)"
            ) from None
        client["nc"] = nc
        node()  # remember where it connected
        bus = cls(settings, nc, role=who.role, signer=who.signer, verifier=who.verifier)
        bus._closing = closing
        try:
            await bus.ensure(tries=setup_tries)
        except BaseException:
            await nc.close()  # no connection is left behind by a bus that never was
            raise
        return bus

    async def ensure(self, tries: int = bus_setup.SETUP_TRIES) -> None:
        """Create or update the streams, the object store and the KV (`groundloop.bus_setup`)."""
        manages = self.signer is None or ROLES[self.role].manages
        stores = await bus_setup.ensure_asking_again(
            self.js, self.settings, self.names, manages=manages, tries=tries
        )
        self._objects, self._processed = stores.objects, stores.processed

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run `closer` when the bus closes, before the connection drains: what reads through
        the connection (`groundloop.log_follower`) stops and deletes its consumers."""
        self._closers.append(closer)

    async def close(self) -> None:
        self._closing["now"] = True
        closers, self._closers = self._closers, []
        for closer in closers:
            try:
                await closer()
            except Exception:  # closing goes on: the connection's drain ends the rest
                log.exception("closing %r failed", closer)
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (TimeoutError, ConnectionClosedError, ConnectionReconnectingError, NatsTimeout):
                await self.nc.close()  # the broker away: nothing left to drain to

    # ------------------------------------------------------------------ subjects

    def subject_filter(self, *, search_id: str = "*", type: str = "*", key: str = ">") -> str:
        if key == ">" and type == "*":
            return f"{self.settings.subject_prefix}.{search_id}.>"
        return f"{self.settings.subject_prefix}.{search_id}.{type}.{key}"

    def subject_of(self, event: Event) -> str:
        return event.subject(self.settings.subject_prefix)

    def dead_letter_subject(self, role: str) -> str:
        return f"{self.settings.subject_prefix}_dlq.{role}"

    @property
    def quarantine_stream(self) -> str:
        return self.names.quarantine_stream

    def quarantine_subject(self, seq: int) -> str:
        return f"{self.settings.subject_prefix}_quarantine.{seq}"

    # ------------------------------------------------------------------ publish

    async def publish(
        self, event: Event, *, once_per_subject: bool = False, retry_for: float = 60.0
    ) -> Published:
        """Store `event` in the log. Retries through broker restarts for up to `retry_for`
        seconds; safe because the message id makes the retry a no-op if the first landed."""
        headers = {"Nats-Msg-Id": event.event_id}
        if once_per_subject:
            headers["Nats-Expected-Last-Subject-Sequence"] = "0"
        telemetry.inject(headers, event)
        body, subject = encode(event), self.subject_of(event)
        if self.signer is not None:
            headers.update(self.signer.headers(subject, body))
        return await self._publish_raw(subject, body, headers, retry_for)

    async def _publish_raw(
        self, subject: str, body: bytes, headers: dict[str, str], retry_for: float
    ) -> Published:
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + retry_for, 0.1
        while True:
            try:
                ack = await self.js.publish(
                    subject, body, headers=headers, stream=None, timeout=PUBLISH_ATTEMPT_S
                )
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
            log.warning("publish to %s failed (%r); retrying in %.1fs", subject, failure, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def dead_letter(
        self, role: str, body: bytes, reason: str, headers: dict[str, str]
    ) -> None:
        """Keep a message that could not be handled, with why, on `<prefix>_dlq.<role>`."""
        keep = body[:KEPT_BYTES]
        meta = {
            **headers,
            "Groundloop-Reason": reason[:1000],
            "Groundloop-Role": role,
            "Groundloop-Body-Bytes": str(len(body)),
        }
        if len(keep) < len(body):
            meta["Groundloop-Truncated"] = "true"
        await self._publish_raw(self.dead_letter_subject(role), keep, meta, retry_for=30.0)

    # ------------------------------------------------------------------ processed records

    async def was_processed(self, role: str, event_id: str) -> bool:
        try:
            await self._processed.get(f"{role}.{event_id}")
            return True
        except KeyNotFoundError:
            return False

    async def mark_processed(self, role: str, event_id: str) -> None:
        await self._processed.put(f"{role}.{event_id}", b"1")

    # ------------------------------------------------------------------ reading the log

    async def read(
        self, subject: str, data: bytes, seq: int, headers: Mapping[str, str] | None = None
    ) -> Event | Quarantined:
        """The one decoding of a log entry for every reader: the event, or the entry
        quarantined (recorded once per stream sequence, whoever reads it first). When events
        are verified, an entry whose signer may not have produced it is quarantined too;
        `headers` are the entry's (fetched by sequence when a caller has none at hand)."""
        entry = read_entry(self.settings.subject_prefix, subject, data or b"")
        if not isinstance(entry, str) and self.verifier is not None:
            if headers is None:
                headers = await self._stored_headers(seq)
            refusal = self.verifier.refusal(
                subject, data or b"", headers, entry.TYPE, entry.producer
            )
            if refusal is None:
                return entry
            entry = f"not vouched for: {refusal}"
        if not isinstance(entry, str):
            return entry
        quarantined = Quarantined(seq, subject, entry, (data or b"")[:KEPT_BYTES])
        if seq not in self._recorded:
            await self._record_quarantine(quarantined, len(data or b""))
            self._recorded.add(seq)
        return quarantined

    async def _record_quarantine(self, entry: Quarantined, size: int) -> None:
        headers = {
            # Once per subject forever (the message id alone only dedupes within its window).
            "Nats-Msg-Id": f"quarantine-{entry.seq}",
            "Nats-Expected-Last-Subject-Sequence": "0",
            "Groundloop-Reason": entry.reason[:1000],
            "Groundloop-Subject": entry.subject,
            "Groundloop-Stream-Seq": str(entry.seq),
            "Groundloop-Body-Bytes": str(size),
        }
        published = await self._publish_raw(
            self.quarantine_subject(entry.seq), entry.body, headers, retry_for=30.0
        )
        if not published.refused and not published.duplicate:
            log.error("%s", entry)

    async def _stored_headers(self, seq: int) -> dict[str, str]:
        try:
            stored = await self.js.get_msg(self.settings.stream, seq)
        except NotFoundError:
            return {}
        return dict(stored.headers or {})

    async def read_stored(self, seq: int) -> Event | Quarantined | None:
        """The entry at stream sequence `seq` (None when there is none, e.g. deleted)."""
        try:
            stored = await self.js.get_msg(self.settings.stream, seq)
        except NotFoundError:
            return None
        return await self.read(stored.subject, stored.data or b"", seq, dict(stored.headers or {}))


def describe(event: Event) -> str:
    """`Type id` for log lines: every line about an event names its type and id."""
    return f"{event.type} {event.event_id}"  # type: ignore[attr-defined]
