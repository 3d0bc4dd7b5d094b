"""What every decision of the evolver is made from (decisions.py): the evolver's world (`Deps`:
environments, the clock, the states of the searches it serves) and one decision's inputs
(`Decision`), whose output events get ids that name the decision, not its trigger; and the
run ids the decisions agree on (baseline, re-evaluation) with the seeds they use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from groundloop.events import Event, RunRequested, SearchCompleted, SearchStarted, stable_id
from groundloop.manifest import Metric

from .state import SearchState

PRODUCER = "evolver"


class EnvironmentInfo(Protocol):
    """What the evolver needs from an environment's manifest (a `Manifest` is one)."""

    resource_class: Any  # "cpu" | "gpu1" | "gpu8"
    seeds: list[int]
    metric: Metric
    budget: Any  # wall_seconds: a run's GPU-seconds are estimated as wall_seconds × gpus
    resources: Any


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class Deps:
    """The evolver's world: environment lookup, clock, and the in-memory states it decides on.

    A search that ended (SearchCompleted or SearchStopped) gets no further decision, so its
    state is dropped and only its id is kept in `ended`: an evolver that serves searches for
    months holds the states of the active ones, not of every search it ever saw (the soak
    benchmark measured ~27 KB per finished search before)."""

    environments: Callable[[str], EnvironmentInfo]
    clock: Clock = field(default_factory=SystemClock)
    states: dict[str, SearchState] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)

    def state(self, search_id: str) -> SearchState:
        if search_id not in self.states:
            self.states[search_id] = SearchState(search_id)
        return self.states[search_id]

    def fold(self, event: Event) -> SearchState | None:
        """Fold `event` into its search's state; None when the search has ended (nothing is
        kept or decided for it any more)."""
        search_id = event.search_id
        if search_id in self.ended:
            return None
        state = self.state(search_id)
        state.apply(event)
        if state.ended:
            del self.states[search_id]
            self.ended.add(search_id)
            return None
        return state


@dataclass
class Decision:
    """One decision's inputs, and how its output events are built."""

    state: SearchState
    deps: Deps
    cause: Event | None
    env: Any  # EnvironmentInfo; None only when ending a search whose environment failed to load

    def __post_init__(self) -> None:
        assert self.state.started is not None
        self.started: SearchStarted = self.state.started
        self.config = self.started.config
        self.now = self.deps.clock.now()

    def event(self, cls: type[Event], *decision: object, **fields: Any) -> Any:
        """An output event whose id names the decision (see the module docstring); its
        causation is the event that triggered it, or for a tick the open generation."""
        generation = self.state.current_generation
        opened = self.state.generations[generation].event_id if generation is not None else None
        cause_id = (
            self.cause.event_id if self.cause is not None else (opened or self.started.event_id)
        )
        return cls(
            event_id=decision_id(self.started, *decision),
            search_id=self.state.search_id,
            occurred_at=self.now,
            causation_id=cause_id,
            producer=PRODUCER,
            **fields,
        )

    def run_request(
        self, run_id: str, purpose: str, seed: int, generation: int, *, idea_id: str | None = None
    ) -> RunRequested:
        patch = self.state.ideas[idea_id].patch if idea_id is not None else None
        return self.event(
            RunRequested,
            "run",
            run_id,
            run_id=run_id,
            purpose=purpose,
            idea_id=idea_id,
            patch_id=patch.patch_id if patch else None,
            generation=generation,
            environment=self.started.environment,
            environment_digest=self.started.environment_digest,
            resource_class=patch.resource_class if patch else self.env.resource_class,
            diff=patch.diff if patch else None,
            diff_key=patch.diff_key if patch else None,
            seed=seed,
        )

    def completed(self, reason: str, **fields: Any) -> SearchCompleted:
        beta = self.state.beta()
        fields.setdefault("baseline_score", beta[0] if beta else None)
        return self.event(
            SearchCompleted, "completed", reason=reason, totals=self.state.totals(), **fields
        )


def decision_id(started: SearchStarted, *decision: object) -> str:
    return stable_id(PRODUCER, started.event_id, *decision)


def seeds_for(manifest_seeds: list[int], count: int) -> list[int]:
    """The first `count` seeds of the manifest's list, extended with the smallest unused
    non-negative integers when the list is shorter."""
    seeds = list(dict.fromkeys(manifest_seeds))[:count]
    candidate = 0
    while len(seeds) < count:
        if candidate not in seeds:
            seeds.append(candidate)
        candidate += 1
    return seeds


def baseline_run_id(search_id: str, seed: int) -> str:
    return stable_id(search_id, "baseline", seed)


def reeval_run_id(search_id: str, idea_id: str, seed: int) -> str:
    return stable_id(search_id, "reeval", idea_id, seed)
