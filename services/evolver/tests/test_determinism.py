"""The evolver's decisions are a function of the log and the seed: re-deciding a recorded
search, re-applied and duplicated events, idea status only moving forward.
"""

from __future__ import annotations

import copy

from groundloop.events import (
    Event,
    GenerationAdvanced,
    GenerationPlan,
    PatchReady,
    RunCompleted,
    RunStarted,
)
from groundloop.evolver.service import Deps, handle
from groundloop.evolver.state import SearchState
from tests import factories as f
from tests.evolver_world import (
    SEARCH,
    ManualClock,
    World,
    decisions,
    manifest,
    search_started,
)

# ---------------------------------------------------------------------------- determinism


def test_decisions_are_a_function_of_the_log_and_the_seed() -> None:
    config = {"generations": 5, "ideas_per_generation": 8, "context_size": 3}
    first = World().run(search_started(**config))
    second = World().run(search_started(**config))
    assert decisions(first.log) == decisions(second.log)
    other_seed = World().run(search_started(seed=1, **config))
    contexts = lambda w: [ga.plan.explore_context_ids for ga in w.generations()]  # noqa: E731
    assert contexts(other_seed) != contexts(first)


def test_a_fresh_evolver_re_decides_a_recorded_search() -> None:
    recorded = (
        World().run(search_started(generations=4, ideas_per_generation=6, context_size=4)).log
    )
    fresh = Deps(environments=lambda name: manifest(), clock=ManualClock())
    redecided: list[Event] = []
    for event in recorded:
        if event.producer != "evolver":
            outputs = handle(event, fresh)
            redecided.extend(outputs)
            for out in outputs:
                fresh.state(SEARCH).apply(out)
    assert decisions(redecided) == decisions(recorded)


def test_re_applying_events_changes_nothing() -> None:
    world = World()
    world.hold = lambda idea_id: world.state.ideas[idea_id].generation == 1  # stop mid-generation 1
    world.run(search_started(generations=3, ideas_per_generation=4))
    assert world.state.current_generation == 1 and len(world.held) == 4
    once = SearchState.fold(world.log)
    assert SearchState.fold(world.log + world.log) == once
    assert SearchState.fold([e for event in world.log for e in (event, event)]) == once
    before = copy.deepcopy(world.state)
    assert once == before
    for event in world.log:  # redelivery of everything: same state, no new decision
        outputs = handle(event, world.deps)
        assert {o.event_id for o in outputs} <= world.ids
    assert world.state == before


def test_a_run_reported_twice_counts_once() -> None:
    world = World(gpu_seconds=10.0).run(search_started(generations=1, ideas_per_generation=2))
    state = SearchState.fold(world.log)
    run = next(e for e in world.log if isinstance(e, RunCompleted) and e.purpose == "search")
    again = run.model_copy(update={"event_id": "another-report", "status": "failed", "score": None})
    state.apply(again)
    assert state.totals() == SearchState.fold(world.log).totals()
    assert state.runs[run.run_id].status == "succeeded"


def test_idea_status_only_moves_forward() -> None:
    world = World().run(search_started(generations=1, ideas_per_generation=1))
    idea_id = next(iter(world.state.ideas))
    assert world.state.ideas[idea_id].status == "done"
    patch = next(e for e in world.log if isinstance(e, PatchReady))
    late_start = patch.derive(
        RunStarted,
        "runner",
        run_id="r-late",
        patch_id=patch.patch_id,
        idea_id=idea_id,
        runner_id="r",
        host="h",
        seed=0,
    )
    world.state.apply(late_start)
    assert world.state.ideas[idea_id].status == "done"
    statuses = []
    state = SearchState(SEARCH)
    for event in world.log:
        state.apply(event)
        if idea_id in state.ideas:
            statuses.append(state.ideas[idea_id].status)
    assert list(dict.fromkeys(statuses)) == ["proposed", "patched", "done"]


def test_what_an_idea_is_ranked_by_is_what_a_fresh_fold_of_the_log_gives() -> None:
    """Scores and rewards are kept per idea between openings; after every event of a log
    that adds runs to measured ideas, fails some, reports a run twice and starts one after it
    ended, they are those of a fold of the log up to that event."""
    started = f.search_started(SEARCH)
    opened = started.derive(
        GenerationAdvanced, "evolver", generation=0, plan=GenerationPlan(fresh=3)
    )
    ideas = [f.idea(opened, slot) for slot in range(3)]
    log: list[Event] = [started, opened, *ideas]
    for round_ in range(3):
        for slot, idea in enumerate(ideas):
            run_id = f"run-{slot}-{round_}"
            status = "failed" if (slot + round_) % 3 == 2 else "succeeded"
            score = None if status == "failed" else 0.1 * slot + round_
            log.append(result(idea, run_id, status, score, "search"))
        log.append(result(ideas[0], f"final-{round_}", "succeeded", 5.0 + round_, "reeval"))
    first = next(e for e in log if isinstance(e, RunCompleted))
    log += [
        first.model_copy(update={"event_id": "again", "score": 99.0, "reward": 99.0}),
        RunStarted(
            search_id=SEARCH,
            producer="runner",
            run_id=first.run_id,
            idea_id=first.idea_id,
            runner_id="r",
            host="h",
            seed=0,
        ),
    ]
    kept = SearchState(SEARCH)
    for at, event in enumerate(log, 1):
        kept.apply(event)
        fresh = SearchState.fold(log[:at])
        for idea in (i for i in ideas if i.idea_id in fresh.ideas):
            for purpose in ("search", "reeval"):
                args = (idea.idea_id, purpose)
                assert kept.idea_scores(*args) == fresh.idea_scores(*args)
                assert kept.idea_rewards(*args) == fresh.idea_rewards(*args)
                assert kept.idea_reward(*args) == fresh.idea_reward(*args)
        assert kept.ranked_ideas() == fresh.ranked_ideas()
    assert kept.idea_scores(ideas[0].idea_id, "reeval") == [5.0, 6.0, 7.0]


def result(idea, run_id: str, status: str, score: float | None, purpose: str) -> RunCompleted:
    return f.run_result(
        SEARCH, run_id, status=status, score=score, purpose=purpose, idea_id=idea.idea_id
    )
