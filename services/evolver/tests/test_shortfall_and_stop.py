"""IdeasShortfall and SearchStopped in the evolver: a short generation closes as soon as the
ideas it got are terminal (not at its deadline); a stopped search gets no further decision,
and no SearchCompleted. Both stay a fold of the log: re-deciding the log changes nothing.
"""

from __future__ import annotations

from groundloop.events import (
    Event,
    GenerationAdvanced,
    IdeaProposed,
    IdeasShortfall,
    PatchFailed,
    RunRequested,
    SearchCompleted,
    SearchStopped,
    stable_id,
)
from groundloop.evolver.redecide import redecide
from groundloop.evolver.state import SearchState
from tests.evolver_world import SEARCH, World, search_started

DEADLINE_S = 3600.0


class ShortWorld(World):
    """The ideator writes only `write` ideas of generation `short`'s plan; with `report`, it
    says so with an IdeasShortfall (as the real ideator does after its re-asks)."""

    def __init__(self, *, short: int, write: int, report: bool):
        super().__init__()
        self.short, self.write, self.report = short, write, report

    def propose(self, ga: GenerationAdvanced) -> list[Event]:
        ideas = super().propose(ga)
        if ga.generation != self.short:
            return ideas
        out: list[Event] = ideas[: self.write]
        if self.report:
            planned = ga.plan.fresh + ga.plan.explore + ga.plan.exploit
            out.append(
                ga.derive(
                    IdeasShortfall,
                    "ideator",
                    -1,
                    generation=ga.generation,
                    planned=planned,
                    proposed=self.write,
                    reason="3 model call(s); 2 without a parsable idea",
                )
            )
        return out


def test_a_short_generation_waits_for_its_deadline_without_the_shortfall_event() -> None:
    world = ShortWorld(short=1, write=2, report=False)
    world.run(
        search_started(generations=3, ideas_per_generation=4, generation_deadline_s=DEADLINE_S)
    )
    assert world.state.current_generation == 1  # stuck: 2 of 4 planned ideas, all terminal
    assert not world.of(SearchCompleted)


def test_a_shortfall_closes_the_generation_on_the_ideas_it_has() -> None:
    world = ShortWorld(short=1, write=2, report=True)
    world.run(
        search_started(generations=3, ideas_per_generation=4, generation_deadline_s=DEADLINE_S)
    )
    # No clock movement at all: the deadline played no part.
    assert [g.generation for g in world.generations()] == [0, 1, 2]
    assert world.generations()[2].previous.ideas == 2
    assert world.state.generations[1].expected == 2
    done = world.completed()
    assert done.reason == "completed 3 generations"
    assert redecide(world.log, world.deps).ok


def test_a_shortfall_of_every_idea_closes_the_generation_at_once() -> None:
    world = ShortWorld(short=0, write=0, report=True)
    world.run(
        search_started(generations=2, ideas_per_generation=3, generation_deadline_s=DEADLINE_S)
    )
    assert [g.generation for g in world.generations()] == [0, 1]
    assert world.generations()[1].previous.ideas == 0
    assert world.of(SearchCompleted)


class StoppingWorld(World):
    """The implementer finds the model unreachable on generation `stop_at`'s first idea: the
    idea gets PatchFailed and the search SearchStopped."""

    def __init__(self, stop_at: int):
        super().__init__()
        self.stop_at = stop_at

    def react(self, event: Event) -> list[Event]:
        if isinstance(event, IdeaProposed) and event.generation == self.stop_at:
            reason = "openai-compatible:x: cannot reach http://127.0.0.1:9/v1 (Connection refused)"
            return [
                event.derive(
                    PatchFailed,
                    "implementer",
                    idea_id=event.idea_id,
                    generation=event.generation,
                    attempts=0,
                    stage="model",
                    last_error=reason,
                ),
                SearchStopped(
                    event_id=stable_id("SearchStopped", event.search_id, "implementer"),
                    search_id=event.search_id,
                    causation_id=event.event_id,
                    producer="implementer",
                    stage="implementer",
                    reason=reason,
                    error_type="LLMUnreachable",
                ),
            ]
        return super().react(event)


def test_a_stopped_search_dispatches_nothing_more_and_does_not_complete() -> None:
    world = StoppingWorld(stop_at=1)
    world.run(search_started(generations=4, ideas_per_generation=3, generation_deadline_s=60))
    stops = world.of(SearchStopped)
    assert len(stops) == 1  # every idea re-published the same id: the log kept one
    stop_at = world.log.index(stops[0])
    after = [e for e in world.log[stop_at:] if e.producer == "evolver"]
    assert after == []
    assert world.state.stopped is not None and world.state.ended
    # Neither its deadline nor later results reopen it.
    world.clock.advance(10 * 60)
    world.tick()
    assert [g.generation for g in world.generations()] == [0, 1]
    assert not world.of(SearchCompleted)
    assert not [e for e in world.log[stop_at:] if isinstance(e, RunRequested)]


def test_a_stop_is_a_fold_of_the_log() -> None:
    world = StoppingWorld(stop_at=1)
    world.run(search_started(generations=4, ideas_per_generation=3))
    report = redecide(world.log, world.deps)
    assert report.ok, [d.describe() for d in report.differences]
    replayed = SearchState.fold(world.log)
    assert replayed.stopped is not None
    assert replayed.stopped.error_type == "LLMUnreachable"
    assert replayed.current_generation == world.state.current_generation == 1


def test_a_stop_before_generation_zero_ends_the_search_during_the_baseline() -> None:
    world = World()
    started = search_started(generations=2, ideas_per_generation=2)
    stop = SearchStopped(
        event_id=stable_id("SearchStopped", started.search_id, "ideator"),
        search_id=started.search_id,
        producer="ideator",
        stage="ideator",
        reason="model not served",
        error_type="ModelNotServed",
    )
    world.run(started, stop)
    assert not world.generations()
    assert not world.of(SearchCompleted)


def test_an_ended_search_leaves_no_state_behind_and_decides_nothing_more() -> None:
    from groundloop.evolver.service import handle, tick

    world = World().run(search_started(generations=2, ideas_per_generation=2))
    assert world.completed() is not None
    assert world.deps.states == {} and world.deps.ended == {SEARCH}
    late = world.log[-2]  # any event of the search delivered again after its end
    assert handle(late, world.deps) == [] and tick(world.deps) == []
    assert world.deps.states == {}  # nothing rebuilt for it
