"""Generation deadlines (late results count later, one decision id whoever makes it) and the
run, GPU-hour, dollar and generation budgets that stop a search.
"""

from __future__ import annotations

import pytest

from groundloop.events import (
    Budgets,
    RunCompleted,
    RunRequested,
)
from groundloop.evolver.service import handle, tick
from tests.evolver_world import (
    World,
    default_loss,
    search_started,
)

# ---------------------------------------------------------------------------- deadlines


def test_a_deadline_closes_a_generation_and_late_results_count_later() -> None:
    late: list[str] = []

    def hold(idea_id: str) -> bool:
        # Hold generation 1's first idea (the best idea of the search) and all of generation 2.
        generation = world.state.ideas[idea_id].generation
        if not late and generation == 1:
            late.append(idea_id)
        return idea_id in late or generation == 2

    loss = lambda idea_id, seed: 1.0 if idea_id in late else default_loss(idea_id, seed)  # noqa: E731
    world = World(loss=loss)
    world.hold = hold
    world.run(search_started(generations=4, ideas_per_generation=4, generation_deadline_s=60))
    assert world.state.current_generation == 1 and late  # stuck on the held idea
    world.clock.advance(59)
    world.tick()
    assert world.state.current_generation == 1
    world.clock.advance(1)
    world.tick()
    assert world.state.current_generation == 2
    ga2 = world.generations()[2]
    assert late[0] not in ga2.plan.exploit_context_ids  # no result yet
    assert late[0] in ga2.plan.explore_context_ids  # but shown as a past idea
    assert ga2.previous.ideas == 4 and ga2.previous.succeeded == 3
    world.release(late[0])  # the late result is recorded...
    assert world.state.idea_scores(late[0]) == [1.0] and world.state.current_generation == 2
    for idea_id in list(world.held):
        world.release(idea_id)
    ga3 = world.generations()[3]
    assert late[0] in ga3.plan.exploit_context_ids  # ...and used from the next generation on
    assert ga3.best_so_far.idea_id == late[0]
    assert world.completed().best_idea_id == late[0]


def test_a_deadline_decision_has_one_id_whoever_makes_it() -> None:
    world = World()
    world.hold = lambda idea_id: world.state.ideas[idea_id].generation == 0
    world.run(search_started(generations=3, ideas_per_generation=2, generation_deadline_s=5))
    world.clock.advance(10)
    by_tick = tick(world.deps)
    by_event = handle(world.log[-1], world.deps)
    assert [e.event_id for e in by_tick] == [e.event_id for e in by_event]
    assert by_tick[0].causation_id == world.state.generations[0].event_id


# ---------------------------------------------------------------------------- budgets


def test_run_budget_shrinks_the_last_generation_and_stops() -> None:
    # 2 baseline + 3 (generation 0) + 1 (generation 1, cut to what is left) + 1 re-evaluation
    # run (the final baseline reuses a baseline run) = 7. More runs: test_hard_budgets.py.
    world = World().run(
        search_started(
            generations=5,
            ideas_per_generation=3,
            final_top_k=1,
            final_seeds=1,
            budgets=Budgets(max_runs=7),
        )
    )
    assert [ga.plan.fresh + ga.plan.explore + ga.plan.exploit for ga in world.generations()] == [
        3,
        1,
    ]
    assert world.completed().reason.startswith("budget spent: the next generation would not fit")
    searched = [e for e in world.of(RunCompleted) if e.purpose == "search"]
    assert len(searched) == 4 and [
        r.seed for r in world.of(RunRequested) if r.purpose == "baseline"
    ][:2] == [7, 8]
    assert len(world.of(RunRequested)) + len(searched) == 7


def test_gpu_hour_budget_stops_the_search() -> None:
    world = World(gpu_seconds=900.0).run(
        search_started(generations=5, ideas_per_generation=3, budgets=Budgets(gpu_hours=1.5))
    )
    # 2 baseline + 3 runs = 1.25 h after generation 0; 2 + 6 runs = 2 h after generation 1.
    assert len(world.generations()) == 2
    assert world.completed().reason.startswith("budget spent: GPU-hours (2 of 1.5)")


def test_dollar_budget_stops_the_search() -> None:
    world = World(cost_per_idea=0.25).run(
        search_started(generations=5, ideas_per_generation=3, budgets=Budgets(dollars=1.5))
    )
    assert len(world.generations()) == 2
    assert world.completed().reason == "budget spent: dollars (1.50 of 1.50)"
    assert world.completed().totals.cost_usd == pytest.approx(1.5)


def test_generation_budget_stops_the_search() -> None:
    world = World().run(
        search_started(generations=5, ideas_per_generation=2, budgets=Budgets(max_generations=2))
    )
    assert [ga.generation for ga in world.generations()] == [0, 1]
    assert world.completed().reason == "budget spent: generations (2)"
