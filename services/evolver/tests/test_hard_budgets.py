"""Run, GPU-hour and dollar budgets are hard: the evolver never dispatches the run (or opens
the generation) that would overshoot, and the final re-evaluation is charged too."""

from __future__ import annotations

import pytest

from groundloop.events import Budgets, RunCompleted, RunRequested
from groundloop.manifest import Budget, Manifest, Metric, Resources
from tests.evolver_world import World, search_started


def dispatched(world: World) -> list[str]:
    """Every run the search started: evolver requests plus the runner's search runs."""
    requested = [r.run_id for r in world.of(RunRequested)]
    searched = [r.run_id for r in world.of(RunCompleted) if r.purpose == "search"]
    assert len(set(requested + searched)) == len(requested + searched)
    return requested + searched


@pytest.mark.parametrize("max_runs", range(14, 24))
def test_max_runs_is_exact_with_the_final_re_evaluation_included(max_runs: int) -> None:
    world = World().run(
        search_started(
            generations=20,
            ideas_per_generation=3,
            baseline_seeds=2,
            final_top_k=2,
            final_seeds=3,
            budgets=Budgets(max_runs=max_runs),
        )
    )
    runs = dispatched(world)
    assert len(runs) == max_runs  # never N+1, and the budget is used
    reeval = [r for r in world.of(RunRequested) if r.purpose == "reeval"]
    assert len(reeval) == 2 * 3  # top-2 ideas on 3 seeds: the reserve kept for them
    done = world.completed()
    assert done.reason.startswith("budget spent") and len(done.final) == 2
    assert done.totals.runs == max_runs


def test_a_run_budget_too_small_for_baseline_and_final_ends_saying_so() -> None:
    world = World().run(
        search_started(generations=3, ideas_per_generation=3, budgets=Budgets(max_runs=4))
    )
    assert dispatched(world) == []
    reason = world.completed().reason
    assert reason.startswith("cannot run this search") and "--max-runs" in reason


def gpu_manifest() -> Manifest:
    return Manifest(
        name="synthetic",
        description="a GPU environment for tests",
        entrypoint=["python", "train.py"],
        editable=["train.py"],
        seeds=[7, 8, 9],
        metric=Metric(name="val_loss", direction="minimize", reward="1/x"),
        budget=Budget(wall_seconds=900),
        resources=Resources(gpus=2),
        resource_class="gpu1",
    )


@pytest.mark.parametrize("gpu_hours", [4.0, 5.5, 7.0])
def test_gpu_hours_stop_before_the_run_that_would_overshoot(gpu_hours: float) -> None:
    # Each run may use 900 s on 2 GPUs = 0.5 GPU-hour, and does.
    world = World(manifest_=gpu_manifest(), gpu_seconds=1800.0).run(
        search_started(
            generations=20,
            ideas_per_generation=3,
            final_top_k=1,
            final_seeds=2,
            budgets=Budgets(gpu_hours=gpu_hours),
        )
    )
    used = sum(r.gpu_seconds for r in world.of(RunCompleted)) / 3600
    assert used <= gpu_hours  # the final re-evaluation's runs included
    assert used > gpu_hours - 0.5  # and no whole run's worth is left unused
    assert any(r.purpose == "reeval" for r in world.of(RunRequested))
    assert world.completed().totals.gpu_seconds / 3600 == pytest.approx(used)


def test_dollar_budget_shrinks_the_generation_that_would_overshoot() -> None:
    # $0.25 an idea: generation 0 spends $0.75; $0.45 is left, which pays for one idea.
    world = World(cost_per_idea=0.25).run(
        search_started(generations=5, ideas_per_generation=3, budgets=Budgets(dollars=1.2))
    )
    sizes = [ga.plan.fresh + ga.plan.explore + ga.plan.exploit for ga in world.generations()]
    assert sizes == [3, 1]
    assert world.completed().totals.cost_usd == pytest.approx(1.0)
    assert world.completed().reason.startswith("budget spent")
