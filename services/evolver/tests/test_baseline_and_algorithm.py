"""The evolver's baseline measurement and Algorithm 1: exploit share, schedules, explore and
exploit contexts, direction awareness, best-of-n; on the simulated `World`.
"""

from __future__ import annotations

import pytest

from groundloop.events import (
    GenerationAdvanced,
    RunRequested,
    stable_id,
)
from groundloop.evolver.algorithm import (
    PastIdea,
    exploit_share,
    generation_rng,
    plan_generation,
    round_half_up,
    sample_weighted,
)
from groundloop.evolver.service import Deps, baseline_run_id, handle, seeds_for
from tests.evolver_world import (
    BASELINE_LOSS,
    SEARCH,
    ManualClock,
    World,
    default_loss,
    search_started,
)

# ---------------------------------------------------------------------------- baseline


def test_baseline_is_measured_before_generation_zero() -> None:
    world = World()
    outputs = handle(search_started(), world.deps)
    assert [type(e) for e in outputs] == [RunRequested, RunRequested]
    assert [(r.purpose, r.seed, r.patch_id, r.resource_class) for r in outputs] == [
        ("baseline", 7, None, "cpu"),
        ("baseline", 8, None, "cpu"),
    ]  # the manifest's seeds, in order
    assert [r.run_id for r in outputs] == [baseline_run_id(SEARCH, 7), baseline_run_id(SEARCH, 8)]
    for request in outputs:
        world.deps.state(SEARCH).apply(request)
    first = world.complete(outputs[0], None, 7, "baseline", None, outputs[0].run_id)
    assert handle(first, world.deps) == []  # one baseline seed still running: no generation yet
    second = world.complete(outputs[1], None, 8, "baseline", None, outputs[1].run_id)
    (advanced,) = handle(second, world.deps)
    assert isinstance(advanced, GenerationAdvanced) and advanced.generation == 0
    assert advanced.plan.fresh == 6 and advanced.plan.exploit == advanced.plan.explore == 0
    assert advanced.causation_id == second.event_id and advanced.previous is None
    losses = [default_loss(None, 7), default_loss(None, 8)]  # 3.02 and 3.03
    assert world.deps.states[SEARCH].beta() == pytest.approx(
        (sum(losses) / 2, (1 / losses[0] + 1 / losses[1]) / 2)
    )


def test_the_real_synthetic_environment_supplies_seeds_and_resource_class() -> None:
    from groundloop.evolver.service import ManifestLookup
    from groundloop.settings import Settings

    lookup = ManifestLookup(Settings().environments_dir)
    env = lookup("synthetic")
    deps = Deps(environments=lookup, clock=ManualClock())
    requests = handle(search_started(baseline_seeds=2), deps)
    assert [(r.seed, r.resource_class) for r in requests] == [
        (seed, env.resource_class) for seed in env.seeds[:2]
    ]


def test_seeds_extend_the_manifest_list() -> None:
    assert seeds_for([7, 8, 9], 2) == [7, 8]
    assert seeds_for([7, 1], 4) == [7, 1, 0, 2]
    assert seeds_for([], 3) == [0, 1, 2]


def test_a_baseline_that_never_runs_ends_the_search() -> None:
    world = World(fail_runs=lambda idea_id: idea_id is None).run(search_started())
    done = world.completed()
    assert "baseline failed on every seed" in done.reason and not world.generations()


def test_an_unknown_schedule_ends_the_search_with_the_fix() -> None:
    world = World().run(search_started(exploit_schedule="sometimes"))
    assert "unknown exploit schedule 'sometimes'" in world.completed().reason
    assert "constant:<a>" in world.completed().reason


# ---------------------------------------------------------------------------- Algorithm 1


def test_exploit_share_schedules() -> None:
    assert [exploit_share("paper", t) for t in range(0, 9)] == pytest.approx(
        [0.0, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8, 0.8, 0.8]
    )
    assert exploit_share("constant:0.25", 3) == 0.25
    assert exploit_share("linear:0.2:0.1:0.5", 1) == pytest.approx(0.2)
    assert exploit_share("linear:0.2:0.1:0.5", 9) == pytest.approx(0.5)
    assert exploit_share("explore", 4) == 0.0
    with pytest.raises(ValueError, match="outside"):
        exploit_share("constant:1.5", 1)
    assert round_half_up(2.5) == 3 and round_half_up(0.5 * 5) == 3


def test_generations_follow_the_paper_schedule() -> None:
    world = World().run(search_started(generations=7, ideas_per_generation=10))
    plans = [ga.plan for ga in world.generations()]
    assert plans[0].fresh == 10 and plans[0].exploit == plans[0].explore == 0
    for t, plan in enumerate(plans[1:], start=1):
        assert plan.fresh == 0
        assert plan.exploit == round_half_up(exploit_share("paper", t) * 10), t
        assert plan.exploit + plan.explore == 10
    assert [p.exploit for p in plans[1:]] == [5, 6, 6, 7, 7, 8]


def test_exploit_context_holds_only_ideas_above_the_baseline() -> None:
    world = World().run(search_started(generations=4, ideas_per_generation=8, context_size=3))
    beta_reward = world.state.beta()[1]
    positives = {i for i in world.state.ideas if (world.state.idea_reward(i) or 0) > beta_reward}
    negatives = {i for i in world.state.ideas if world.state.idea_reward(i) is not None} - positives
    assert positives and negatives  # the test world makes both kinds
    for ga in world.generations()[1:]:
        earlier = {i for i, idea in world.state.ideas.items() if idea.generation < ga.generation}
        assert 0 < len(ga.plan.exploit_context_ids) <= 3
        assert set(ga.plan.exploit_context_ids) <= positives & earlier
        assert len(ga.plan.explore_context_ids) == 3 and set(ga.plan.explore_context_ids) <= earlier


def test_explore_context_includes_failures() -> None:
    first_ideas = [stable_id(SEARCH, 0, index) for index in range(8)]  # World's idea ids
    world = World(
        fail_patch=lambda idea_id: idea_id in first_ideas[:2],
        fail_runs=lambda idea_id: idea_id == first_ideas[2],
    )
    world.run(search_started(generations=2, ideas_per_generation=8))
    assert [world.state.ideas[i].status for i in first_ideas[:3]] == [
        "patch_failed",
        "patch_failed",
        "done",
    ]
    assert world.state.idea_scores(first_ideas[2]) == []  # its run failed
    context = world.generations()[1].plan.explore_context_ids
    assert context == first_ideas  # every generation-0 idea, failures included (8 ≤ K = 100)


def test_all_slots_explore_until_an_idea_beats_the_baseline() -> None:
    world = World(loss=lambda idea_id, seed: BASELINE_LOSS + (0.0 if idea_id is None else 0.5))
    world.run(search_started(generations=3, ideas_per_generation=5))
    for ga in world.generations()[1:]:
        assert (ga.plan.exploit, ga.plan.explore, ga.plan.exploit_context_ids) == (0, 5, [])


def test_direction_awareness_uses_the_reward() -> None:
    """For a maximised metric a higher score is better: reward x, so β compares the same way."""
    past = [
        PastIdea("good", 0, 0.9, "done"),
        PastIdea("bad", 0, 0.1, "done"),
        PastIdea("none", 0, None, "patch_failed"),
    ]
    plan = plan_generation(
        generation=1,
        strategy="evolution",
        config=search_started().config,
        size=4,
        past=past,
        beta=0.5,
        search_seed=0,
    )
    assert plan.exploit_context_ids == ["good"] and plan.explore_context_ids == [
        "good",
        "bad",
        "none",
    ]
    assert (plan.exploit, plan.explore) == (2, 2)


def test_score_weighted_context_prefers_better_ideas() -> None:
    items = [("best", 1.0), ("mid", 0.3), ("worst", 0.01)]
    picks = [sample_weighted(items, 1, generation_rng(seed, 1))[0] for seed in range(600)]
    assert picks.count("best") > picks.count("mid") > picks.count("worst")
    world = World().run(
        search_started(
            generations=3, ideas_per_generation=8, context_size=2, exploit_context="score_weighted"
        )
    )
    beta_reward = world.state.beta()[1]
    for ga in world.generations()[1:]:
        assert all(world.state.idea_reward(i) > beta_reward for i in ga.plan.exploit_context_ids)


def test_best_of_n_is_all_fresh_without_context() -> None:
    world = World().run(search_started(strategy="best_of_n", generations=3, ideas_per_generation=4))
    assert [ga.generation for ga in world.generations()] == [0, 1, 2]
    for ga in world.generations():
        assert (ga.plan.fresh, ga.plan.exploit, ga.plan.explore) == (4, 0, 0)
        assert ga.plan.exploit_context_ids == ga.plan.explore_context_ids == []
    assert world.completed().reason == "completed 3 generations"


def test_generation_summary_and_best_so_far() -> None:
    world = World().run(search_started(generations=2, ideas_per_generation=6))
    ga1 = world.generations()[1]
    gen0 = [i for i, idea in world.state.ideas.items() if idea.generation == 0]
    losses = {i: default_loss(i, 0) for i in gen0}
    best = min(losses, key=losses.get)
    assert ga1.previous.model_dump() == {
        "generation": 0,
        "ideas": 6,
        "patched": 6,
        "succeeded": 6,
        "best_score": pytest.approx(losses[best]),
        "mean_score": pytest.approx(sum(losses.values()) / 6),
    }
    assert ga1.best_so_far.idea_id == best  # lowest loss = highest reward
