"""Re-decide: feed a recorded search to a fresh evolver and report every decision that differs.

The evolver's decisions are a deterministic function of the log and the search seed, so a
fresh evolver handed the recorded events in log order (every event except the evolver's own
outputs, with its clock set to each event's occurred_at) must emit exactly the recorded
RunRequested, GenerationAdvanced and SearchCompleted events. Each output is folded at once,
as the live `EvolverLoop` does, and compared with the recorded output of the same event id,
payload without occurred_at and causation_id (a wall-clock time, and the trigger, which for a
deadline or start-up tick is not an event of the log).

Deadline-driven decisions depend on the times of the evolver's ticks, which the log does not
record: re-decide makes such a decision at the first event after the deadline instead, so a
search closed by a deadline can differ where results arrived between that tick and the next
event. The same holds for decisions an evolver made in its start-up tick after a crash.

    report = redecide(events_of_one_search, Deps(environments=ManifestLookup(dir)))
    report.ok, report.differences                 # `groundloop replay re-decide SEARCH`
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from groundloop.events import Event, GenerationAdvanced
from groundloop.search_index import fitting_events

from .decision_context import PRODUCER, Deps
from .service import CONSUMED_TYPES, handle
from .state import SearchState

_NOT_COMPARED = {"occurred_at", "causation_id"}


class ReplayClock:
    """The clock of a replay: the occurred_at of the event being handled."""

    def __init__(self, start: datetime | None = None):
        self.current = start or datetime(1970, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current


@dataclass(frozen=True)
class Difference:
    """One decision the fresh evolver made differently. kind: "changed" (same event id,
    other payload), "missing" (recorded, not re-decided), "extra" (re-decided, not recorded)."""

    kind: Literal["changed", "missing", "extra"]
    event_id: str
    type: str
    fields: tuple[str, ...] = ()  # top-level fields that differ (for "changed")
    recorded: dict[str, Any] | None = None
    redecided: dict[str, Any] | None = None

    def describe(self) -> str:
        if self.kind == "changed":
            parts = [
                f"{name}: recorded {_short(self.recorded, name)} vs re-decided "
                f"{_short(self.redecided, name)}"
                for name in self.fields
            ]
            return f"{self.type} {self.event_id} differs: " + "; ".join(parts)
        return f"{self.type} {self.event_id} {'recorded but not re-decided' if self.kind == 'missing' else 're-decided but never recorded'}"


@dataclass
class RedecideReport:
    search_id: str
    events: int  # events fed to the fresh evolver
    recorded: int  # decisions in the log
    redecided: int  # decisions of the fresh evolver
    differences: list[Difference] = field(default_factory=list)
    state: SearchState | None = None  # the fresh evolver's state at the end

    @property
    def ok(self) -> bool:
        return not self.differences


def decision_payload(event: Event) -> dict[str, Any]:
    return event.model_dump(mode="json", exclude=_NOT_COMPARED)


def redecide(recorded: list[Event], deps: Deps) -> RedecideReport:
    """Re-decide one recorded search with a fresh evolver built from `deps` (only its
    environment lookup is used: states start empty and the clock replays the log's times).
    Only events that fit the log are re-decided from (forged or inconsistent ones are skipped,
    as every live reader skips them: `groundloop.search_index`)."""
    recorded = fitting_events(recorded)
    search_ids = {e.search_id for e in recorded}
    if len(search_ids) != 1:
        raise ValueError(
            f"re-decide takes the events of one search, got {len(search_ids)}: "
            f"{sorted(search_ids)[:5]}"
        )
    (search_id,) = search_ids
    clock = ReplayClock(recorded[0].occurred_at)
    fresh = dataclasses.replace(deps, clock=clock, states={}, ended=set())
    state = fresh.state(search_id)
    redecided: dict[str, Event] = {}
    fed = 0
    for event in recorded:
        if event.producer == PRODUCER:
            continue  # the decisions under test
        fed += 1
        clock.current = event.occurred_at
        if not isinstance(event, CONSUMED_TYPES):
            state.apply(event)  # folded by the live evolver's catch-up, never decided on
            continue
        for out in handle(event, fresh):
            if out.event_id in redecided:
                continue  # the log would drop the duplicate
            if isinstance(out, GenerationAdvanced) and out.generation in state.advanced_generations:
                continue  # the bus refuses a second GenerationAdvanced per generation
            redecided[out.event_id] = out
            state.apply(out)
    decisions: dict[str, Event] = {}
    for event in recorded:
        if event.producer == PRODUCER:
            decisions.setdefault(event.event_id, event)
    return RedecideReport(
        search_id, fed, len(decisions), len(redecided), compare(decisions, redecided), state
    )


def compare(recorded: dict[str, Event], redecided: dict[str, Event]) -> list[Difference]:
    """Differences between two id → decision maps, in recorded order, extras last."""
    out: list[Difference] = []
    for event_id, old in recorded.items():
        new = redecided.get(event_id)
        if new is None:
            out.append(Difference("missing", event_id, old.TYPE, recorded=decision_payload(old)))
            continue
        a, b = decision_payload(old), decision_payload(new)
        if a != b:
            fields = tuple(k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k))
            out.append(Difference("changed", event_id, old.TYPE, fields, a, b))
    for event_id, new in redecided.items():
        if event_id not in recorded:
            out.append(Difference("extra", event_id, new.TYPE, redecided=decision_payload(new)))
    return out


def _short(payload: dict[str, Any] | None, name: str, limit: int = 160) -> str:
    text = repr((payload or {}).get(name))
    return text if len(text) <= limit else text[: limit - 1] + "…"
