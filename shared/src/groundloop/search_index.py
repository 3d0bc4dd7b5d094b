"""What a search is, read from the log: the check that a role acts only on events that fit it.

A valid event can still be garbage: a PatchReady for a search never started, a PatchReady for
an idea its search never proposed, a RunRequested not written by the evolver, a RunCompleted
for a run nobody asked for. `SearchIndex` folds the facts such checks need (when each search
started, which ideas were proposed, which patches were ready, which runs were requested or
follow from a ready patch), each with the stream sequence that established it, and
`refusal(event, seq)` says why the event at `seq` does not fit the log before it, or None.
It also applies the rule of the once-per-subject events (`groundloop.guarded_publish`): only
the first valid one of the producer that writes it counts, so a fold of the log in order
(the evolver, `replay rebuild`, `fitting_events` for re-decide) skips what consumers refuse.

Exact, not hopeful: everything an event depends on was published before it, so it precedes
it in the log; the index compares against the facts with a lower stream sequence than the
event's own (known on delivery). A lagging reader therefore never rejects a legitimate event,
and every reader reaches the same verdict on the same entry, whenever it reads it.

`LogIndex` keeps a `SearchIndex` per search caught up from the bus by a follower of the
search's log (`groundloop.log_follower`), which reads each entry once. A refused entry is
recorded once in the quarantine stream (like undecodable ones, keyed by its stream sequence,
with the reason); the role that received it dead-letters it (groundloop.consumer), one record
per role. Copied history (fork, import) is exempt: a fork writes its SearchStarted last, and
copies are facts no role acts on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError

from groundloop import events as ev
from groundloop.bus import WRONG_LAST_SEQUENCE, Bus
from groundloop.bus_reading import LOG_END
from groundloop.log_follower import LogFollowers
from groundloop.producers import (
    ONE_PER_SUBJECT,
    RUN_REQUESTER,
    is_history,
    original_producer,
    writes_guarded,
)
from groundloop.quarantine import KEPT_BYTES, Quarantined

log = logging.getLogger(__name__)

NOW = LOG_END  # "the log as it is": every recorded fact precedes it

Entry = tuple[int, ev.Event | Quarantined]


@dataclass
class SearchIndex:
    """Facts of every search seen, each with the stream sequence that established it."""

    started: dict[str, int] = field(default_factory=dict)  # search -> its SearchStarted
    ideas: dict[tuple[str, str], int] = field(default_factory=dict)  # (search, idea)
    patches: dict[tuple[str, str], int] = field(default_factory=dict)  # (search, patch)
    runs: dict[tuple[str, str], int] = field(default_factory=dict)  # (search, run)
    ones: dict[str, int] = field(default_factory=dict)  # guarded subject -> its one event

    def exists(self, search_id: str, before: int = NOW) -> bool:
        return self.started.get(search_id, NOW) < before

    def idea_proposed(self, search_id: str, idea_id: str, before: int = NOW) -> bool:
        return self.ideas.get((search_id, idea_id), NOW) < before

    def patch_ready(self, search_id: str, patch_id: str, before: int = NOW) -> bool:
        return self.patches.get((search_id, patch_id), NOW) < before

    def run_known(self, search_id: str, run_id: str, before: int = NOW) -> bool:
        return self.runs.get((search_id, run_id), NOW) < before

    def refusal(self, event: ev.Event, seq: int = NOW) -> str | None:
        """Why the event stored at `seq` does not fit the facts before it; None if it does."""
        if (why := self._guard_refusal(event, seq)) is not None:
            return why
        if is_history(event) or isinstance(event, ev.SearchStarted):
            return None
        sid, kind = event.search_id, event.TYPE
        if not self.exists(sid, seq):
            return f"a {kind} of search {sid!r}, which has no SearchStarted before it"
        if isinstance(event, ev.PatchReady | ev.PatchFailed):
            if not self.idea_proposed(sid, event.idea_id, seq):
                return f"a {kind} for idea {event.idea_id}, which search {sid!r} never proposed"
        elif isinstance(event, ev.RunRequested):
            if original_producer(event) != RUN_REQUESTER:
                return (
                    f"a RunRequested by {event.producer!r}: only the {RUN_REQUESTER} asks for runs"
                )
            if event.patch_id is not None and not self.patch_ready(sid, event.patch_id, seq):
                return f"a RunRequested for patch {event.patch_id}, never ready in search {sid!r}"
        elif isinstance(event, ev.RunStarted | ev.RunCompleted):
            if not self.run_known(sid, event.run_id, seq):
                return (
                    f"a {kind} for run {event.run_id}, which search {sid!r} never asked for "
                    "(no RunRequested, no PatchReady it is the run of)"
                )
        return None

    def _guard_refusal(self, event: ev.Event, seq: int) -> str | None:
        """Of each once-per-subject event, only the first valid one of the producer that
        writes it counts (the rule of `groundloop.guarded_publish`, there read off the bus)."""
        producer = ONE_PER_SUBJECT.get(event.TYPE)
        if producer is None:
            return None
        if not writes_guarded(event):
            return f"a {event.TYPE} by {event.producer!r}: only the {producer} writes it"
        first = self.ones.get(_guarded_key(event), NOW)
        if first < seq:
            return (
                f"a second {event.TYPE} on its subject: the first, stream seq {first}, is the one"
            )
        return None

    def observe(self, event: ev.Event, seq: int) -> str | None:
        """Fold the event stored at `seq` if it fits (returns None), else return why not."""
        if writes_guarded(event):
            # The subject's one even where it fits nothing else (the guard counts it too).
            self.ones.setdefault(_guarded_key(event), seq)
        reason = self.refusal(event, seq)
        if reason is not None:
            return reason
        sid = event.search_id
        if isinstance(event, ev.SearchStarted):
            self.started.setdefault(sid, seq)
        elif isinstance(event, ev.IdeaProposed):
            self.ideas.setdefault((sid, event.idea_id), seq)
        elif isinstance(event, ev.PatchReady):
            self.patches.setdefault((sid, event.patch_id), seq)
            # The patch's first run is implied: the runner derives its id like this (runs.py).
            self.runs.setdefault((sid, ev.stable_id(event.patch_id, event.seed)), seq)
        elif isinstance(event, ev.RunRequested):
            self.runs.setdefault((sid, event.run_id), seq)
        return None


def _guarded_key(event: ev.Event) -> str:
    return event.subject("log")  # any one prefix: a key within one log


def fitting_events(events: Iterable[ev.Event]) -> list[ev.Event]:
    """The events a fold may take, of events read from the log in order (their positions
    stand in for stream sequences: only the order matters); for `replay re-decide`."""
    index = SearchIndex()
    return [event for at, event in enumerate(events, 1) if index.observe(event, at) is None]


class SearchFold:
    """One search's log folded in order (a `log_follower.Fold`): its `SearchIndex`, and
    `fit` called with every event that fits the log before it, the events `fitting_events`
    keeps. Roles that fold more subclass it and share one follower per search."""

    def __init__(self, search_id: str):
        self.search_id = search_id
        self.index = SearchIndex()

    def add(self, seq: int, entry: ev.Event | Quarantined) -> None:
        if not isinstance(entry, Quarantined) and self.index.observe(entry, seq) is None:
            self.fit(seq, entry)

    def fit(self, seq: int, event: ev.Event) -> None:
        """Called with each event that fits, in log order; nothing here."""


class LogIndex:
    """Does an event fit its search's log: a `SearchIndex` per search, kept current by a
    follower of the search's log (`groundloop.log_follower`), so each entry is read once.
    `followers` lets a role that folds more of the log (a `SearchFold` subclass) share them."""

    def __init__(self, bus: Bus, followers: LogFollowers[SearchFold] | None = None):
        self.bus = bus
        self.followers: LogFollowers[SearchFold] = followers or LogFollowers(bus, SearchFold)

    async def refusal(self, event: ev.Event, seq: int) -> str | None:
        """Why the event stored at `seq` does not fit its search's log; the refusal is then
        already recorded in the quarantine stream (once per entry, whoever finds it). The
        index may hold entries after `seq`: it compares against the facts before it, each
        kept with the stream sequence that first established it."""
        fold = await self.followers.through(event.search_id, seq)
        reason = fold.index.refusal(event, seq)
        if reason is not None:
            await record_refusal(
                self.bus, seq, self.bus.subject_of(event), ev.encode(event), reason
            )
        return reason


async def read_entries(bus: Bus, subject: str, start: int = 1, before: int = NOW) -> list[Entry]:
    """Entries on `subject` (a filter) from stream sequence `start` up to, not including,
    `before` (or the log's current end), each read through `Bus.read` (`Bus.read_range`)."""
    return await bus.read_range(subject, start, before)


async def record_refusal(bus: Bus, seq: int, subject: str, body: bytes, reason: str) -> None:
    """Record the entry at `seq` in the quarantine stream, once (the record's subject takes
    one message: a second recorder is refused by the broker), in `Bus.quarantined`'s format."""
    headers = {
        "Nats-Msg-Id": f"quarantine-{seq}",
        "Nats-Expected-Last-Subject-Sequence": "0",
        "Groundloop-Reason": reason[:1000],
        "Groundloop-Subject": subject,
        "Groundloop-Stream-Seq": str(seq),
        "Groundloop-Body-Bytes": str(len(body)),
    }
    for attempt in range(5):
        try:
            ack = await bus.js.publish(
                bus.quarantine_subject(seq), body[:KEPT_BYTES], headers=headers
            )
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return  # recorded already, by this process or another
            if exc.code and exc.code < 500:
                raise
        except (TimeoutError, NatsTimeout, OSError):
            await asyncio.sleep(0.2 * (attempt + 1))
            continue
        else:
            if not ack.duplicate:
                log.error("refused stream seq %d on %s: %s", seq, subject, reason)
            return
    log.error("could not record the refusal of stream seq %d (%s)", seq, reason)
