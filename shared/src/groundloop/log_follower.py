"""Per-search views of the log kept current by following it: each entry is read once.

Roles check or fold a search's log for the events they handle: the implementer, the runners
and the projector ask whether an event fits its search (`search_index.LogIndex`), the
ideator and the rl-trainer fold the search's history, the implementer its spend. Reading the
entries since the last read through a temporary consumer per delivered event (create, info,
fetch, delete) cost four API requests per event and role; re-reading the whole log per event
cost O(n) per event and O(n^2) per search.

`LogFollowers` keeps one state per search (a `Fold`: anything with `add(seq, entry)`), fed
every entry of the search once, in stream order, read through `Bus.read` (so garbage is
quarantined on the way, as by every reader). Its follower is an ephemeral push consumer on
the search's subjects, started when first needed from the first entry not folded yet; in
steady state entries arrive as they are written, with no request per event.

Not nats-py's ordered consumer: when its subscription's pending limits are exceeded (a slow
fold, a replica catching up a big search) it drops entries after its order tracking has moved
past them, so a fold missed them silently; and it answers the broker's "stalled" heartbeat at
once, so a slow fold's buffer grew by a flow-control window per heartbeat. The follower takes
the bulk reader's delivery (`bus_reading.PushDelivery`): entries checked to come in consumer
order; one missing (dropped by the client, never sent) or the consumer silent for `SILENT_S`
(deleted, the broker restarted) ends that consumer, and a new one starts from the first entry
not folded. Flow control is answered once every entry delivered before it is taken, so a
follower holds at most the flow-control window (up to 32 MiB) however slow its fold; its
pending limits (`pending_msgs`, `pending_bytes`) are above that, and one exceeded anyway (the
event loop starved) costs a new consumer, not an entry.

- `through(search, seq)`: the state once every entry of the search up to stream sequence
  `seq` is folded (later ones may be folded too: a fold that must not see them compares
  sequences, as `SearchIndex.refusal` does). The caller knows that an entry of the search is
  at `seq` (the delivered event itself), so the follower gets there.
- `to_end(search)`: the state up to the search's last entry now (one request: the last
  message on the search's subjects).

Correctness never depends on the follower: when it makes no progress for `stall_s` while a
caller waits (its consumer deleted, the broker restarted, a target with no entry), the
entries up to the target are read directly (`Bus.read_range`) and the follower restarts
after them. An entry at or below the folded position is skipped, whoever delivers it, so a
state is the fold of the search's log from its first entry, in order, each entry once.

A follower holds a consumer and memory: one unused for `idle_s` (`ended_s` once its search
completed or stopped) is closed and its state dropped; a later call folds the search again
from its start. Closing the bus closes them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from nats.js.errors import NotFoundError

from groundloop.bus_reading import REOPENS, SILENT_S, PushDelivery
from groundloop.events import Event, SearchCompleted, SearchStopped
from groundloop.quarantine import Quarantined

if TYPE_CHECKING:
    from groundloop.bus import Bus

log = logging.getLogger(__name__)

# Above the flow-control window (32 MiB; or 512k payloads of 64 bytes, far smaller than events).
PENDING_BYTES = 64 * 1024 * 1024
PENDING_MSGS = 512 * 1024


class Fold(Protocol):
    """One search's state, folded from its log entries in stream order."""

    def add(self, seq: int, entry: Event | Quarantined) -> None: ...


F = TypeVar("F", bound=Fold, covariant=True)  # a fold of a subclass stands in for its base


class _Followed(PushDelivery):
    """Counting what its callback got: nats-py counts a message dropped for a full subscription
    as delivered (`Subscription.delivered`), so a drop is seen at once, not at the next entry
    or heartbeat (a burst's tail dropped whole would cost a heartbeat per consumer)."""

    def __init__(self) -> None:
        super().__init__()
        self.got = 0

    async def on_message(self, msg: Any) -> None:
        self.got += 1
        await super().on_message(msg)

    def dropped_by(self, sub: Any) -> bool:
        return sub.delivered > self.got + sub.pending_msgs


class FollowerFailed(Exception):
    """Folding a search's log failed; its state is dropped and the next call starts over."""


@dataclass(eq=False)
class _Follower:
    search_id: str
    subject: str  # the search's subjects (a filter)
    state: Any  # the caller's Fold
    folded_to: int = 0  # every entry of the search up to this stream sequence is folded
    task: asyncio.Task[None] | None = None  # folds what its consumers deliver; None: stopped
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one folder at a time
    waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)
    in_use: int = 0
    used_at: float = 0.0
    ended: bool = False  # its search completed or stopped: closed sooner when unused
    failed: BaseException | None = None


class LogFollowers(Generic[F]):
    """One process's followed searches, each with its state `new_state(search_id)`."""

    def __init__(
        self,
        bus: Bus,
        new_state: Callable[[str], F],
        *,
        idle_s: float = 120.0,
        ended_s: float = 10.0,
        stall_s: float = 3.0,
        pending_msgs: int = PENDING_MSGS,
        pending_bytes: int = PENDING_BYTES,
    ):
        self.bus, self.new_state = bus, new_state
        self.idle_s, self.ended_s, self.stall_s = idle_s, ended_s, stall_s
        # Each follower's subscription: beyond them nats-py drops deliveries (seen as a gap).
        self.pending_msgs, self.pending_bytes = pending_msgs, pending_bytes
        self._followers: dict[str, _Follower] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        bus.on_close(self.close)

    @property
    def following(self) -> list[str]:
        """The searches with a state kept (for tests and logs)."""
        return list(self._followers)

    async def through(self, search_id: str, seq: int) -> F:
        """The search's state with every entry up to stream sequence `seq` folded."""
        follower = self._take(search_id)
        try:
            await self._reach(follower, seq)
            return follower.state
        finally:
            self._release(follower)

    async def to_end(self, search_id: str) -> F:
        """The search's state with every entry now in the log folded."""
        follower = self._take(search_id)
        try:
            try:
                last = await self.bus.js.get_last_msg(self.bus.settings.stream, follower.subject)
            except NotFoundError:  # no entry at all
                return follower.state
            await self._reach(follower, last.seq)
            return follower.state
        finally:
            self._release(follower)

    async def close(self) -> None:
        """Stop every follower and delete its consumer (also run by `Bus.close`)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for follower in list(self._followers.values()):
            self._wake_waiters(follower, FollowerFailed("the log followers were closed"))
            await self._drop(follower)

    # ------------------------------------------------------------------ waiting

    def _take(self, search_id: str) -> _Follower:
        self._refuse_if_closed(search_id)
        follower = self._followers.get(search_id)
        if follower is None:
            subject = self.bus.subject_filter(search_id=search_id)
            follower = _Follower(search_id, subject, self.new_state(search_id))
            self._followers[search_id] = follower
            if self._sweeper is None or self._sweeper.done():
                self._sweeper = asyncio.create_task(self._sweep())
        follower.in_use += 1
        return follower

    def _refuse_if_closed(self, search_id: str) -> None:
        if self._closed:
            raise FollowerFailed(
                f"the log followers of bus {self.bus.role!r} are closed (the bus is closing): "
                f"search {search_id} can no longer be read through them"
            )

    def _release(self, follower: _Follower) -> None:
        follower.in_use -= 1
        follower.used_at = asyncio.get_running_loop().time()

    async def _reach(self, follower: _Follower, target: int) -> None:
        loop = asyncio.get_running_loop()
        while follower.folded_to < target:
            if follower.failed is not None:
                raise FollowerFailed(
                    f"folding the log of search {follower.search_id} failed: {follower.failed!r}"
                ) from follower.failed
            if follower.task is None:
                await self._start(follower)
                continue
            progress = follower.folded_to
            waiter: asyncio.Future[None] = loop.create_future()
            follower.waiters.append((target, waiter))
            try:
                await asyncio.wait_for(waiter, self.stall_s)
            except TimeoutError:
                pass
            finally:
                with contextlib.suppress(ValueError):
                    follower.waiters.remove((target, waiter))
            # Nothing came: stalled, or its follower stopped and woke the waiters at once.
            if follower.folded_to == progress:
                await self._read_directly(follower, target)

    def _advance(self, follower: _Follower, to: int) -> None:
        follower.folded_to = max(follower.folded_to, to)
        if not follower.waiters:
            return
        waiting = []
        for target, waiter in follower.waiters:
            if target > follower.folded_to:
                waiting.append((target, waiter))
            elif not waiter.done():
                waiter.set_result(None)
        follower.waiters = waiting

    # ------------------------------------------------------------------ folding

    def _fold(self, follower: _Follower, seq: int, entry: Event | Quarantined) -> None:
        follower.state.add(seq, entry)
        if isinstance(entry, SearchCompleted | SearchStopped):
            follower.ended = True
        self._advance(follower, seq)

    async def _start(self, follower: _Follower) -> None:
        async with follower.lock:
            if follower.task is not None or follower.failed is not None:
                return
            self._refuse_if_closed(follower.search_id)  # closed while this call waited
            opened = await self._open(follower)  # failing here, the caller learns why
            follower.task = asyncio.create_task(self._follow(follower, *opened))

    async def _open(self, follower: _Follower) -> tuple[_Followed, Any, str]:
        """A push consumer on the search's subjects from the first entry not folded, as the
        bulk reader's (`LogReading.open_push`), with this follower's pending limits."""
        delivery = _Followed()
        sub, name = await self.bus.open_push(
            follower.subject,
            follower.folded_to + 1,
            delivery,
            pending_msgs_limit=self.pending_msgs,
            pending_bytes_limit=self.pending_bytes,
        )
        return delivery, sub, name

    async def _follow(self, follower: _Follower, delivery: _Followed, sub: Any, name: str) -> None:
        """Fold what each consumer delivers; one that misses an entry or falls silent is
        replaced by one from the first entry not folded. Ends when stopped (cancelled), when
        a new consumer cannot be had (the next call starts one), or when a fold fails."""
        fruitless = 0
        try:
            while True:
                before = follower.folded_to
                try:
                    level, why = await self._fold_delivered(follower, delivery, sub)
                finally:
                    await self.bus.close_push(sub, name)
                fruitless = 0 if follower.folded_to > before else fruitless + 1
                log.log(
                    level,
                    "log follower of search %s: %s after stream seq %d; following again from it",
                    *(follower.search_id, why, follower.folded_to),
                )
                try:
                    if fruitless >= REOPENS:  # never seen: the next `_reach` starts again
                        raise RuntimeError(f"{fruitless} consumers in a row folded nothing")
                    delivery, sub, name = await self._open(follower)
                except Exception as exc:  # the broker away: the next `_reach` starts again
                    log.warning("log follower of search %s stopped: %r", follower.search_id, exc)
                    self._wake_waiters(follower)  # not left to wait `stall_s` for nothing
                    return
        except Exception as exc:
            self._fail(follower, exc)
        finally:
            if follower.task is asyncio.current_task():
                follower.task = None

    async def _fold_delivered(
        self, follower: _Follower, delivery: _Followed, sub: Any
    ) -> tuple[int, str]:
        """Fold the entries `delivery` brings, in order, until one is missing or nothing at
        all (not even a heartbeat) came for `SILENT_S`; why it ended (a log level, a line)."""
        loop = asyncio.get_running_loop()
        while True:
            if delivery.ready:
                await self._fold_message(follower, await delivery.take(self.bus.nc))
                continue
            if delivery.broken or delivery.dropped_by(sub):  # by a full subscription, or unsent
                return logging.WARNING, "an entry went missing"
            if not await delivery.wait(self.bus.nc, loop.time() + SILENT_S):
                return logging.INFO, "its consumer fell silent"  # deleted, or broker restarted

    async def _fold_message(self, follower: _Follower, msg: Any) -> None:
        seq = msg.metadata.sequence.stream
        async with follower.lock:
            if seq <= follower.folded_to:
                return  # folded already (read directly)
            entry = await self.bus.read(msg.subject, msg.data, seq, msg.headers or {})
            self._fold(follower, seq, entry)

    async def _read_directly(self, follower: _Follower, target: int) -> None:
        async with follower.lock:
            if follower.folded_to >= target:
                return
            log.warning(
                "log follower of search %s: nothing for %.1fs after stream seq %d; reading "
                "up to %d directly and restarting it",
                follower.search_id,
                self.stall_s,
                follower.folded_to,
                target,
            )
            start = follower.folded_to + 1
            for seq, entry in await self.bus.read_range(follower.subject, start, target + 1):
                if seq > follower.folded_to:
                    self._fold(follower, seq, entry)
            self._advance(follower, target)  # the search has no entry between
            await self._stop(follower)  # restarted after `target` when next needed

    def _fail(self, follower: _Follower, exc: BaseException) -> None:
        """Called by the follower's own task, which then ends (closing its consumer)."""
        log.error("log follower of search %s failed: %r", follower.search_id, exc)
        follower.failed = exc
        self._wake_waiters(follower, FollowerFailed(f"search {follower.search_id}: {exc!r}"))
        if self._followers.get(follower.search_id) is follower:
            del self._followers[follower.search_id]

    def _wake_waiters(self, follower: _Follower, exc: Exception | None = None) -> None:
        """Every waiter returns now (then reads directly), or raises `exc`."""
        for _target, waiter in follower.waiters:
            if waiter.done():
                continue
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
        follower.waiters = []

    # ------------------------------------------------------------------ closing

    async def _stop(self, follower: _Follower) -> None:
        """End the follower's task; its consumer is deleted on the way out."""
        task, follower.task = follower.task, None
        if task is None or task is asyncio.current_task():
            return
        task.cancel()
        await asyncio.wait([task])  # not `await task`: its cancellation is not the caller's

    async def _drop(self, follower: _Follower) -> None:
        if self._followers.get(follower.search_id) is follower:
            del self._followers[follower.search_id]
        await self._stop(follower)

    async def _sweep(self) -> None:
        """Close followers left unused; ends when none is left (restarted with the next)."""
        loop = asyncio.get_running_loop()
        period = max(min(self.idle_s, self.ended_s) / 2, 0.05)
        while self._followers and not self.bus.nc.is_closed:
            await asyncio.sleep(period)
            now = loop.time()
            for follower in list(self._followers.values()):
                unused_for = self.ended_s if follower.ended else self.idle_s
                if follower.in_use == 0 and now - follower.used_at >= unused_for:
                    await self._drop(follower)
