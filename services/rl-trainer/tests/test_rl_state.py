"""The trainer's fold of a search's log: steps, groups, rewards (0 on any failure), when an
update is due, and when a group is sampled. Pure: no broker, no torch."""

from __future__ import annotations

from groundloop import events as ev
from groundloop.rl_trainer.state import RLState
from tests import factories as f


def rl_search(strategy: str = "rl") -> ev.SearchStarted:
    return f.search_started("rl1", strategy=strategy, rl=ev.RLSettings())


def update(started: ev.SearchStarted, step: int, generation: int) -> ev.PolicyUpdated:
    return ev.PolicyUpdated(
        search_id=started.search_id,
        producer="rl-trainer",
        policy_version=step + 1,
        step=step,
        generation=generation,
        checkpoint_key=f"rl/x/policy-v{step + 1}",
        mean_reward=0.5,
        max_reward=1.0,
    )


def test_a_group_is_due_for_its_update_once_every_idea_has_a_result_and_failures_count_zero():
    started = rl_search()
    g0 = f.generation_advanced(started, 0, ev.GenerationPlan(rl=3))
    ideas = [f.policy_idea(g0, slot, 0) for slot in range(3)]
    log: list[ev.Event] = [started, g0, *ideas]
    state = RLState.fold("rl1", log)
    assert state.uses_policy and state.version == 0
    assert state.due_sample() is None  # all three written
    assert state.due_update() is None  # no result yet

    log += [
        f.run_of_idea(ideas[0], "succeeded", 0.9),
        f.run_of_idea(ideas[1], "timed_out", None),
    ]
    assert RLState.fold("rl1", log).due_update() is None  # one idea has no result
    failed = ev.PatchFailed(
        search_id="rl1",
        producer="implementer",
        idea_id=ideas[2].idea_id,
        generation=0,
        attempts=1,
        stage="rejected",
        last_error="WIDTH out of range",
    )
    group = RLState.fold("rl1", [*log, failed]).due_update()
    assert group is not None and group.step == 0
    assert group.reward_list("rl1") == [0.9, 0.0, 0.0]


def test_a_later_result_of_the_same_idea_changes_nothing():
    started = rl_search()
    g0 = f.generation_advanced(started, 0, ev.GenerationPlan(rl=1))
    idea = f.policy_idea(g0, 0, 0)
    first = f.run_of_idea(idea, "failed", None)
    second = f.run_of_idea(idea, "succeeded", 0.8)
    group = RLState.fold("rl1", [started, g0, idea, first, second]).due_update()
    assert group is not None and group.reward_list("rl1") == [0.0]


def test_a_group_left_behind_by_the_next_generation_trains_with_zeros_for_missing_results():
    started = rl_search()
    g0 = f.generation_advanced(started, 0, ev.GenerationPlan(rl=2))
    ideas = [f.policy_idea(g0, slot, 0) for slot in range(2)]
    done = f.run_of_idea(ideas[0], "succeeded", 0.7)
    g1 = f.generation_advanced(started, 1, ev.GenerationPlan(rl=2))
    state = RLState.fold("rl1", [started, g0, *ideas, done, g1])
    group = state.due_update()
    assert group is not None and group.reward_list("rl1") == [0.7, 0.0]
    # Generation 1 waits for step 0's update: its policy version (1) is not published yet.
    state.apply(update(started, 0, 0))
    assert state.version == 1 and state.due_update() is None
    sample = state.due_sample()
    assert sample is not None and sample.generation == 1 and sample.step == 1


def test_hybrid_slots_follow_the_ideators_and_evolution_ideas_are_not_the_policys():
    started = rl_search("hybrid")
    g0 = f.generation_advanced(started, 0, ev.GenerationPlan(fresh=2, rl=2))
    theirs = [f.idea(g0, slot) for slot in range(2)]
    state = RLState.fold("rl1", [started, g0, *theirs])
    group = state.due_sample()
    assert group is not None and group.first_slot == 2 and group.size == 2
    assert group.idea_id("rl1", 0) == ev.stable_id("rl1", 0, 2)
    assert not group.ideas  # the ideator's ideas are not the group's
    assert len(state.ideas) == 2  # but they are history (novelty, past trajectories)


def test_nothing_is_sampled_after_the_search_ended_and_other_strategies_are_ignored():
    started = rl_search()
    g0 = f.generation_advanced(started, 0, ev.GenerationPlan(rl=2))
    stopped = ev.SearchStopped(
        search_id="rl1", producer="cli", stage="user", reason="stopped by the user"
    )
    assert RLState.fold("rl1", [started, g0, stopped]).due_sample() is None
    evolution = f.search_started("ev1")
    assert not RLState.fold("ev1", [evolution]).uses_policy


def test_past_trajectories_and_earlier_texts_come_from_earlier_generations_only():
    started = rl_search()
    g0 = f.generation_advanced(started, 0, ev.GenerationPlan(rl=2))
    ideas = [f.policy_idea(g0, slot, 0) for slot in range(2)]
    g1 = f.generation_advanced(started, 1, ev.GenerationPlan(rl=2))
    late = f.policy_idea(g1, 0, 1)
    log = [started, g0, *ideas, f.run_of_idea(ideas[1], "succeeded", 0.6), g1, late]
    state = RLState.fold("rl1", log)
    assert state.earlier_texts(1) == [i.text for i in ideas]
    assert state.past_trajectories(1, 5) == [(ideas[1].text, 0.6)]
    assert state.past_trajectories(1, 0) == []
