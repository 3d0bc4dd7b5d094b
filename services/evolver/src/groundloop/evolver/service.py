"""The evolver service: measures the baseline, runs Algorithm 1 (or best-of-N), closes
generations, enforces budgets and ends each search with a statistical re-evaluation.

Consumes: SearchStarted, GenerationAdvanced, IdeaProposed, IdeasShortfall, PatchReady,
PatchFailed, RunRequested, RunStarted, RunCompleted, SearchCompleted, SearchStopped (all folded
into `SearchState`), plus a periodic tick for generation deadlines. A stopped search is over:
nothing more is emitted for it.
Emits: RunRequested (purpose baseline / reeval), GenerationAdvanced (exactly once per
generation: `publish_event` guards the per-generation subject), SearchCompleted.

Garbage never changes a decision: every reading of the log (start-up replay, catch-up, the
delivered event) folds only entries that `Bus.read` accepts and that fit their search's log
up to their own stream sequence (`groundloop.search_index`: no idea never proposed, no run
never asked for, no RunRequested but the evolver's), and of each once-per-subject event only
the first valid one of the producer that writes it (`groundloop.guarded_publish`). A delivered
misfit is quarantined and dead-lettered (Reject); one met while catching up is only skipped
and quarantined: the replica it was delivered to dead-letters it.

    handle(event, deps) -> list[Event]     fold the event, then decide (pure apart from deps)
    tick(deps) -> list[Event]              decide for every active search (deadlines)
    role(tick_s=1.0)                       the service, declared for groundloop.skeleton
    await run(settings, stop)              the service on the bus
    python -m groundloop.evolver           run it alone (GROUNDLOOP_NATS_URL must be set)

The decisions themselves live in decisions.py (their inputs in decision_context.py), Algorithm 1 in algorithm.py, the fold in
state.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from groundloop.bus import Bus
from groundloop.consumer import Delivery, Reject
from groundloop.events import EVENT_TYPES, Event, PolicyUpdated, encode
from groundloop.execution.environment import Environment
from groundloop.guarded_publish import publish_event
from groundloop.quarantine import Quarantined as QuarantinedEntry
from groundloop.search_index import SearchIndex, read_entries, record_refusal
from groundloop.settings import Settings
from groundloop.skeleton import Role, run_role

from .decision_context import (
    PRODUCER,
    Clock,
    Deps,
    EnvironmentInfo,
    SystemClock,
    baseline_run_id,
    reeval_run_id,
    seeds_for,
)
from .decisions import decide

__all__ = [
    "Clock",
    "Deps",
    "EnvironmentInfo",
    "EvolverLoop",
    "ManifestLookup",
    "SystemClock",
    "baseline_run_id",
    "decide",
    "handle",
    "reeval_run_id",
    "role",
    "run",
    "seeds_for",
    "tick",
]

log = logging.getLogger(__name__)

# Everything about a search; PolicyUpdated is the rl-trainer's and changes no decision here.
CONSUMED_TYPES = tuple(cls for cls in EVENT_TYPES if cls is not PolicyUpdated)


def handle(event: Event, deps: Deps) -> list[Event]:
    """Fold `event` into its search's state, then decide what follows. Handling an event
    that was already folded decides again on the current state (same ids for the same
    decisions), which is what makes redelivery harmless. An ended search decides nothing."""
    state = deps.fold(event)
    return [] if state is None else decide(state, deps, cause=event)


def tick(deps: Deps) -> list[Event]:
    """Deadline check for every active search (called periodically by the run loop)."""
    outputs: list[Event] = []
    for state in list(deps.states.values()):
        outputs.extend(decide(state, deps, cause=None))
    return outputs


class ManifestLookup:
    """Environment name → manifest, loaded once per name from the environments folder."""

    def __init__(self, environments_dir: Path):
        self.environments_dir = environments_dir
        self._cache: dict[str, EnvironmentInfo] = {}

    def __call__(self, name: str) -> EnvironmentInfo:
        if name not in self._cache:
            self._cache[name] = Environment.load(name, self.environments_dir).manifest
        return self._cache[name]


class EvolverLoop:
    """`handle` on the bus. Outputs are published here (not by `consume`) so that each one
    the log accepted is folded at once and the next decision sees it; a duplicate or refused
    output is not folded (the log holds another copy, which arrives in turn).

    Replicas share the durable consumer, so each is delivered only some events. Before
    deciding on the event at stream sequence S, a replica folds every entry after the last
    one it folded and before S (direct gets for a short gap, one batched read for a long
    one; with one replica the gap holds only types it does not consume), so every decision
    is made on the whole log prefix up to its trigger, as a single replica would make it.
    Each deadline tick first folds the log up to its current end, so an idle replica is never
    stale. Two replicas reaching the same decision publish it under the same id, and the log
    keeps one (message-id de-duplication; the once-per-subject guard for GenerationAdvanced).
    """

    BATCH_GAP = 32  # a gap longer than this is read with one ephemeral consumer

    def __init__(self, bus: Bus, deps: Deps):
        self.bus, self.deps = bus, deps
        self.lock = asyncio.Lock()  # the consumer and the ticker never decide at once
        self.folded_to = 0  # every stream entry up to this sequence is folded (or skipped)
        self.index = SearchIndex()  # the facts of the entries folded, by stream sequence
        self._recorded: set[int] = set()  # misfits this process put in the quarantine

    async def rebuild(self) -> None:
        """Fold the whole log, then decide once for every search: a decision made before a
        crash but never published is published now."""
        count = 0
        async for seq, event in self.bus.raw_events():
            await self._fold(event, seq)
            self.folded_to, count = max(self.folded_to, seq), count + 1
        log.info(
            "evolver: rebuilt %d searches (%d ended) from %d events",
            len(self.deps.states) + len(self.deps.ended),
            len(self.deps.ended),
            count,
        )
        async with self.lock:
            await self._publish(tick(self.deps))

    async def on_event(self, event: Event, delivery: Any) -> list[Event]:
        async with self.lock:
            msg = getattr(delivery, "msg", None)
            seq = getattr(delivery, "seq", 0) or (msg.metadata.sequence.stream if msg else 0)
            if seq:
                await self._fold_through(seq - 1)
                why = self.misfit(event, seq)
                if why is not None:
                    await self._record(event, seq, why)
                    raise Reject(f"not folded: {why}")
            outputs = handle(event, self.deps)
            if seq == self.folded_to + 1:  # the delivered entry is folded now too
                self.folded_to = seq
            await self._publish(outputs)
        return []

    def misfit(self, event: Event, seq: int) -> str | None:
        """Why the event stored at `seq` must not be folded (None: fold it), recording its
        facts when it fits. Entries come in log order, so the facts before `seq` are known."""
        return self.index.observe(event, seq)

    async def _fold(self, event: Event, seq: int) -> None:
        why = self.misfit(event, seq)
        if why is None:
            self.deps.fold(event)
        else:
            await self._record(event, seq, why)

    async def _record(self, event: Event, seq: int, why: str) -> None:
        """Quarantine the misfit at `seq` (once: the broker keeps one record per entry)."""
        if seq in self._recorded:
            return
        self._recorded.add(seq)
        log.warning("evolver: not folding stream seq %d, %s: %s", seq, event.event_id, why)
        subject = self.bus.subject_of(event)
        await record_refusal(self.bus, seq, subject, encode(event), why)

    async def _fold_through(self, last: int) -> None:
        """Fold every stream entry up to sequence `last` (inclusive) not yet folded: what the
        other replicas were delivered. `folded_to` never claims an entry not read, or that
        entry would be missing from every later decision of this replica."""
        if last - self.folded_to > self.BATCH_GAP:
            subject = self.bus.subject_filter()
            for seq, entry in await read_entries(self.bus, subject, self.folded_to + 1, last + 1):
                # The one reading of the log: a bad entry is quarantined once and skipped.
                if not isinstance(entry, QuarantinedEntry):
                    await self._fold(entry, seq)
                self.folded_to = seq
        for missing in range(self.folded_to + 1, last + 1):  # short gap, or what was not read
            entry = await self.bus.read_stored(missing)
            if entry is not None and not isinstance(entry, QuarantinedEntry):
                await self._fold(entry, missing)
            self.folded_to = missing

    async def tick_forever(self, stop: asyncio.Event, period: float) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=period)
            except TimeoutError:
                pass
            if stop.is_set():
                return
            try:
                await self.tick_once()
            except Exception:  # the loop boundary: a failed tick is retried by the next one
                log.exception("evolver: deadline tick failed")

    async def tick_once(self) -> None:
        """One deadline check, on the log as it is now."""
        async with self.lock:
            # Fold what other replicas were delivered meanwhile, so that an idle replica
            # never decides on a stale state.
            await self._fold_through((await self.bus.stream_state())["last_seq"])
            await self._publish(tick(self.deps))

    async def _publish(self, outputs: list[Event]) -> None:
        for out in outputs:
            result = await publish_event(self.bus, out)
            if result.refused or result.duplicate:
                log.info(
                    "evolver: %s %s already in the log (%s)",
                    out.TYPE,
                    out.event_id,
                    "refused" if result.refused else "duplicate",
                )
                continue
            log.info(
                "evolver: published %s %s for search %s", out.TYPE, out.event_id, out.search_id
            )
            why = self.misfit(out, result.seq)  # records its facts for the events that follow
            if why is not None:  # every reader will skip it too: fold what they fold
                log.error("evolver: its own %s does not fit the log: %s", out.event_id, why)
                continue
            self.deps.fold(out)
            if result.seq == self.folded_to + 1:  # nothing landed in between: no gap to read
                self.folded_to = result.seq


# Deliveries held at once. They are still handled one at a time, in log order (they reach
# EvolverLoop.lock in the order fetched, and the lock is first come, first served; one that
# overtakes another is harmless: the entries before it are folded first), but fetched
# together: with one at a time, every event cost the evolver a fetch request of its own
# (4 per candidate).
PREFETCH = 16


def role(*, tick_s: float = 1.0, deps: Deps | None = None) -> Role[EvolverLoop]:
    """The evolver on the bus: on start, rebuild every search's state from the log (and
    publish any decision lost in a crash); then consume events, with a deadline tick every
    `tick_s` seconds beside the consumer until `stop` is set."""

    @contextlib.asynccontextmanager
    async def context(
        settings: Settings, bus: Bus, stop: asyncio.Event
    ) -> AsyncIterator[EvolverLoop]:
        loop = EvolverLoop(
            bus, deps or Deps(environments=ManifestLookup(settings.environments_dir))
        )
        await loop.rebuild()
        ticker = asyncio.create_task(loop.tick_forever(stop, tick_s))
        try:
            yield loop
        finally:
            stop.set()  # the consumer is done (or failed): the ticker goes too
            await ticker

    async def on_event(event: Event, delivery: Delivery, loop: EvolverLoop) -> list[Event]:
        return await loop.on_event(event, delivery)

    # history=True: copied (forked/imported) events are part of the state it decides on.
    # dedupe=False: a redelivered event needs no processed-events mark to be harmless here.
    # Folding is idempotent (SearchState keeps the event ids it applied, SearchIndex the
    # first sequence of each fact), and a decision is a function of the folded log whose
    # outputs are written once (ids that name the decision, guarded subjects), as when a
    # replica re-decides on what another was delivered. The marks cost two JetStream round
    # trips per event, for four of the six marks a candidate made.
    return Role(
        name=PRODUCER,
        consumes=CONSUMED_TYPES,
        deps=context,
        handle=on_event,
        history=True,
        dedupe=False,
        concurrency=PREFETCH,
    )


async def run(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    tick_s: float = 1.0,
    deps: Deps | None = None,
) -> None:
    """Rebuild every search's state from the log, then consume events and tick for deadlines
    until `stop` is set."""
    await run_role(role(tick_s=tick_s, deps=deps), settings, stop or asyncio.Event())
