"""The steady schedule: generation t+1 opens once half of t has results (and every older
generation is settled), so slots never wait for a generation's last run; the final
re-evaluation still waits for every result, and each generation's summary is given once,
complete. The generational schedule (the paper's) is untouched by it.
"""

from __future__ import annotations

import pytest

from groundloop.events import GenerationAdvanced, RunCompleted, RunRequested, SearchStarted
from groundloop.evolver.service import handle
from tests import factories
from tests.evolver_world import World, search_started
from tests.paths import ENVIRONMENTS


def log_index(world: World, predicate) -> list[int]:
    return [at for at, event in enumerate(world.log) if predicate(event)]


def search_results(world: World, generation: int) -> list[int]:
    return log_index(
        world,
        lambda e: (
            isinstance(e, RunCompleted) and e.purpose == "search" and e.generation == generation
        ),
    )


def opened(world: World, generation: int) -> int:
    (at,) = log_index(
        world, lambda e: isinstance(e, GenerationAdvanced) and e.generation == generation
    )
    return at


def test_the_next_generation_opens_when_half_of_the_current_one_has_results() -> None:
    world = World().run(search_started(generations=4, ideas_per_generation=6, schedule="steady"))
    assert [ga.generation for ga in world.generations()] == [0, 1, 2, 3]
    for g in range(3):
        results = search_results(world, g)
        assert len(results) == 6
        # Decided on the third result of six, not on the last.
        assert world.generations()[g + 1].causation_id == world.log[results[2]].event_id
    assert world.completed().reason == "completed 4 generations"


def test_an_early_plan_uses_only_the_results_in_and_every_summary_is_complete() -> None:
    world = World().run(search_started(generations=4, ideas_per_generation=6, schedule="steady"))
    for ga in world.generations()[1:]:
        at = opened(world, ga.generation)
        with_results = {
            e.idea_id for e in world.log[:at] if isinstance(e, RunCompleted) and e.idea_id
        }
        # Exploit parents are ideas that had a result when the plan was made.
        assert set(ga.plan.exploit_context_ids) <= with_results
    summaries = [ga.previous for ga in world.generations() if ga.previous is not None]
    # Each closed generation summarised once, with every idea's result (the last generation
    # has no opening after it).
    assert [s.generation for s in summaries] == [0, 1]
    assert all(s.ideas == 6 and s.succeeded == 6 for s in summaries)


def test_the_final_re_evaluation_waits_for_every_generation() -> None:
    world = World().run(search_started(generations=3, ideas_per_generation=4, schedule="steady"))
    last_search_result = max(
        log_index(world, lambda e: isinstance(e, RunCompleted) and e.purpose == "search")
    )
    first_reeval = min(
        log_index(world, lambda e: isinstance(e, RunRequested) and e.purpose == "reeval")
    )
    assert first_reeval > last_search_result
    ranked = {idea for idea, _ in world.state.ranked_ideas()}
    assert len(ranked) == 12  # every idea of every generation was considered for the final


def test_an_unsettled_older_generation_holds_early_openings_back() -> None:
    held: set[str] = set()

    def hold(idea_id: str) -> bool:
        # Hold one idea of generation 0: generation 1 opens early, generation 2 must not.
        if not held and world.state.ideas[idea_id].generation == 0:
            held.add(idea_id)
        return idea_id in held

    world = World()
    world.hold = hold
    world.run(search_started(generations=4, ideas_per_generation=4, schedule="steady"))
    assert [ga.generation for ga in world.generations()] == [0, 1]
    assert all(idea.terminal for idea in world.state.ideas.values() if idea.generation == 1)
    # Generation 1 is complete, but generation 0 is not: nothing opens, nothing is final.
    assert not world.of(RunRequested) or all(
        r.purpose == "baseline" for r in world.of(RunRequested)
    )
    (idea,) = held
    world.release(idea)
    assert [ga.generation for ga in world.generations()] == [0, 1, 2, 3]
    assert [ga.previous.generation for ga in world.generations()[2:]] == [0, 1]
    assert world.completed() is not None


def test_a_generation_opens_early_only_once_every_idea_of_the_current_one_is_written() -> None:
    class SlowIdeator(World):
        late: list = []

        def propose(self, ga: GenerationAdvanced) -> list:
            ideas = super().propose(ga)
            if ga.generation == 1:  # half of generation 1 written now, the rest later
                self.late = ideas[2:]
                return ideas[:2]
            return ideas

    world = SlowIdeator()
    world.run(search_started(generations=3, ideas_per_generation=4, schedule="steady"))
    assert [ga.generation for ga in world.generations()] == [0, 1]
    assert len(search_results(world, 1)) == 2  # half of 4 terminal, but 2 not yet written
    world.run(*world.late)
    assert [ga.generation for ga in world.generations()] == [0, 1, 2]
    assert world.completed() is not None


def test_the_generational_schedule_opens_only_after_the_last_result() -> None:
    world = World().run(search_started(generations=3, ideas_per_generation=6))
    for g in range(2):
        last = world.log[search_results(world, g)[-1]]
        assert world.generations()[g + 1].causation_id == last.event_id
    assert [ga.previous.generation for ga in world.generations()[1:]] == [0, 1]


def test_a_replayed_steady_search_decides_the_same() -> None:
    world = World().run(search_started(generations=3, ideas_per_generation=4, schedule="steady"))
    replayed = World()
    for event in world.log:
        if event.producer != "evolver":
            replayed.evolver_outputs(handle(event, replayed.deps))
    decided = [e.event_id for e in replayed.log]
    assert decided == [e.event_id for e in world.log if e.producer == "evolver"]


def request(strategy: str, schedule: str) -> None:
    from groundloop.execution.environment import Environment

    env = Environment.load("synthetic", ENVIRONMENTS)
    factories.requested_search(
        env, "s", strategy=strategy, ideas=2, deadline=None, schedule=schedule
    )


@pytest.mark.parametrize("strategy", ["best_of_n", "rl", "hybrid"])
def test_steady_is_refused_for_strategies_that_need_whole_generations(strategy: str) -> None:
    with pytest.raises(ValueError, match="only the evolution strategy"):
        request(strategy, "steady")
    with pytest.raises(ValueError, match="valid values: generational, steady"):
        request("evolution", "asap")


def test_a_v3_search_started_lifts_to_the_generational_schedule() -> None:
    import json

    from groundloop.events import decode, encode

    payload = json.loads(encode(search_started()))
    del payload["config"]["schedule"]
    payload["version"] = 3
    lifted = decode(json.dumps(payload).encode())
    assert isinstance(lifted, SearchStarted) and lifted.config.schedule == "generational"
    assert lifted.version == 4


class HeldBaseline(World):
    """The baseline's runs finish only when the test says so (a slow baseline)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.baseline: list[RunRequested] = []
        self.holding = True

    def react(self, event):
        if isinstance(event, RunRequested) and event.purpose == "baseline" and self.holding:
            self.baseline.append(event)
            return []
        return super().react(event)

    def finish_baseline(self) -> World:
        held, self.baseline, self.holding = self.baseline, [], False
        return self.run(*(self.complete(r, None, r.seed, "baseline", None, r.run_id) for r in held))


def test_steady_generation_0_runs_beside_the_baseline_and_generation_1_waits_for_it() -> None:
    world = HeldBaseline().run(
        search_started(generations=3, ideas_per_generation=4, schedule="steady")
    )
    assert len(world.baseline) == 2  # both baseline seeds still running
    assert [ga.generation for ga in world.generations()] == [0]
    assert len(search_results(world, 0)) == 4  # generation 0 complete meanwhile
    requests = log_index(world, lambda e: isinstance(e, RunRequested))
    assert max(requests) < opened(world, 0)  # the budget counted the baseline first
    world.finish_baseline()
    assert [ga.generation for ga in world.generations()] == [0, 1, 2]
    settling = [e for e in world.of(RunCompleted) if e.purpose == "baseline"][1]
    assert world.generations()[1].causation_id == settling.event_id  # the baseline's last run
    assert world.completed().reason == "completed 3 generations"


def test_steady_a_baseline_that_fails_on_every_seed_still_ends_the_search() -> None:
    world = HeldBaseline(fail_runs=lambda idea_id: idea_id is None).run(
        search_started(generations=3, ideas_per_generation=4, schedule="steady")
    )
    assert [ga.generation for ga in world.generations()] == [0]
    world.finish_baseline()
    assert [ga.generation for ga in world.generations()] == [0]
    assert world.completed().reason.startswith("baseline failed on every seed")


def test_generational_generation_0_still_waits_for_the_baseline() -> None:
    world = HeldBaseline().run(search_started(generations=2, ideas_per_generation=4))
    assert not world.generations() and len(world.baseline) == 2
    world.finish_baseline()
    assert [ga.generation for ga in world.generations()] == [0, 1]
