"""The evolver's decisions, tested on its pure `handle`/`tick` with synthetic event sequences.

`World` plays the log and the other services: it keeps JetStream's two guarantees the
evolver relies on (an event id is stored once; one GenerationAdvanced per generation), folds
each accepted evolver output at once (as `EvolverLoop` does), delivers every event back to the
evolver in log order, and answers like the ideator, implementer and runners would, with
scores the test chooses. No broker, except in the last test, which runs `run()` on a real
nats-server (two replicas, then a restart).
"""

from __future__ import annotations

import copy
import hashlib
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from groundloop.events import (
    Budgets,
    Event,
    GenerationAdvanced,
    IdeaProposed,
    ImplementerInfo,
    ImplementerSettings,
    PatchFailed,
    PatchReady,
    PreflightReport,
    ProposerInfo,
    ProposerSettings,
    RunCompleted,
    RunRequested,
    RunStarted,
    SearchCompleted,
    SearchConfig,
    SearchStarted,
    Usage,
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
from groundloop.evolver.service import Deps, baseline_run_id, handle, seeds_for, tick
from groundloop.evolver.state import SearchState
from groundloop.evolver.stats import mean_ci, welch_t_test
from groundloop.manifest import Budget, Manifest, Metric

SEARCH = "s1"
BASELINE_LOSS = 3.0


def manifest(**metric: object) -> Manifest:
    return Manifest(
        name="synthetic",
        description="a closed-form environment for tests",
        entrypoint=["python", "train.py"],
        editable=["train.py"],
        seeds=[7, 8, 9],
        metric=Metric(name="val_loss", direction="minimize", reward="1/x", **metric),
        budget=Budget(wall_seconds=10),
        resource_class="cpu",
    )


class ManualClock:
    """A clock the test moves by hand (the evolver reads time only for deadlines)."""

    def __init__(self) -> None:
        self.current = datetime(2025, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


def search_started(strategy: str = "evolution", seed: int = 0, **config: object) -> SearchStarted:
    values: dict[str, object] = {
        "generations": 4,
        "ideas_per_generation": 6,
        "baseline_seeds": 2,
        "final_top_k": 2,
        "final_seeds": 3,
    }
    values.update(config)
    return SearchStarted(
        event_id=f"start-{SEARCH}",
        search_id=SEARCH,
        producer="cli",
        environment="synthetic",
        environment_digest="d" * 64,
        strategy=strategy,
        config=SearchConfig(**values),
        proposer=ProposerSettings(kind="knobs"),
        implementer=ImplementerSettings(kind="knobs"),
        seed=seed,
    )


def quality(idea_id: str) -> float:
    """A fixed pseudo-random quality in [0, 1) per idea."""
    return int(hashlib.sha256(idea_id.encode()).hexdigest()[:8], 16) / 2**32


def default_loss(idea_id: str | None, seed: int) -> float:
    base = BASELINE_LOSS if idea_id is None else BASELINE_LOSS + 0.3 - 0.6 * quality(idea_id)
    return base + 0.01 * (seed % 5)


class World:
    def __init__(
        self,
        *,
        manifest_: Manifest | None = None,
        loss: Callable[[str | None, int], float] = default_loss,
        fail_patch: Callable[[str], bool] = lambda idea_id: False,
        cost_per_idea: float = 0.0,
        gpu_seconds: float = 0.0,
        fail_runs: Callable[[str | None], bool] = lambda idea_id: False,
    ):
        self.clock = ManualClock()
        env = manifest_ or manifest()
        self.deps = Deps(environments=lambda name: env, clock=self.clock)
        self.log: list[Event] = []
        self.ids: set[str] = set()
        self.opened: set[int] = set()
        self.queue: deque[Event] = deque()
        self.held: dict[str, PatchReady] = {}  # patches whose run the test releases by hand
        self.hold: Callable[[str], bool] = lambda idea_id: False
        self.loss, self.fail_patch, self.fail_runs = loss, fail_patch, fail_runs
        self.cost_per_idea, self.gpu_seconds = cost_per_idea, gpu_seconds

    # -- the log
    def publish(self, event: Event) -> bool:
        if event.event_id in self.ids:
            return False  # JetStream duplicate
        if isinstance(event, GenerationAdvanced):
            if event.generation in self.opened:
                return False  # refused: once per subject
            self.opened.add(event.generation)
        self.ids.add(event.event_id)
        self.log.append(event)
        self.queue.append(event)
        return True

    def evolver_outputs(self, outputs: list[Event]) -> None:
        for out in outputs:
            assert out.producer == "evolver"
            if self.publish(out):
                self.deps.state(out.search_id).apply(out)

    def run(self, *events: Event, max_events: int = 5000) -> World:
        for event in events:
            self.publish(event)
        handled = 0
        while self.queue:
            event = self.queue.popleft()
            self.evolver_outputs(handle(event, self.deps))
            for reaction in self.react(event):
                self.publish(reaction)
            handled += 1
            assert handled < max_events, "the search does not converge"
        return self

    def tick(self) -> World:
        self.evolver_outputs(tick(self.deps))
        return self.run()

    # -- the other services
    def react(self, event: Event) -> list[Event]:
        if isinstance(event, GenerationAdvanced):
            return self.propose(event)
        if isinstance(event, IdeaProposed):
            return [self.implement(event)]
        if isinstance(event, PatchReady):
            if self.hold(event.idea_id):
                self.held[event.idea_id] = event
                return []
            return [self.complete(event, event.idea_id, event.seed, "search", event.patch_id)]
        if isinstance(event, RunRequested):
            return [
                self.complete(
                    event, event.idea_id, event.seed, event.purpose, event.patch_id, event.run_id
                )
            ]
        return []

    def propose(self, ga: GenerationAdvanced) -> list[Event]:
        plan = ga.plan
        modes = ["exploit"] * plan.exploit + ["explore"] * plan.explore + ["fresh"] * plan.fresh
        out = []
        for index, mode in enumerate(modes):
            parents = plan.exploit_context_ids if mode == "exploit" else []
            out.append(
                ga.derive(
                    IdeaProposed,
                    "ideator",
                    index,
                    idea_id=stable_id(SEARCH, ga.generation, index),
                    generation=ga.generation,
                    mode=mode,
                    parent_ids=parents,
                    title=f"idea {ga.generation}.{index}",
                    text="change a knob",
                    proposer=ProposerInfo(kind="knobs"),
                    usage=Usage(cost_usd=self.cost_per_idea),
                )
            )
        return out

    def implement(self, idea: IdeaProposed) -> Event:
        if self.fail_patch(idea.idea_id):
            return idea.derive(
                PatchFailed,
                "implementer",
                idea_id=idea.idea_id,
                generation=idea.generation,
                attempts=2,
                stage="apply",
                last_error="context mismatch",
            )
        return idea.derive(
            PatchReady,
            "implementer",
            patch_id=stable_id("patch", idea.idea_id),
            idea_id=idea.idea_id,
            generation=idea.generation,
            environment="synthetic",
            environment_digest="d" * 64,
            diff=f"diff for {idea.idea_id}\n",
            diff_digest="x",
            patched_digest="y",
            implementer=ImplementerInfo(kind="knobs"),
            preflight=PreflightReport(passed=True),
        )

    def complete(
        self,
        cause: Event,
        idea_id: str | None,
        seed: int,
        purpose: str,
        patch_id: str | None,
        run_id: str | None = None,
    ) -> RunCompleted:
        failed = self.fail_runs(idea_id)
        loss = self.loss(idea_id, seed)
        return cause.derive(
            RunCompleted,
            "runner",
            run_id=run_id or stable_id("run", cause.event_id),
            patch_id=patch_id,
            idea_id=idea_id,
            generation=getattr(cause, "generation", 0),
            purpose=purpose,
            status="failed" if failed else "succeeded",
            score=None if failed else loss,
            reward=0.0 if failed else 1 / loss,
            seed=seed,
            gpu_seconds=self.gpu_seconds,
        )

    def release(self, idea_id: str) -> World:
        patch = self.held.pop(idea_id)
        return self.run(self.complete(patch, idea_id, patch.seed, "search", patch.patch_id))

    # -- reading
    @property
    def state(self) -> SearchState:
        return self.deps.states[SEARCH]

    def of(self, cls: type[Event]) -> list:
        return [e for e in self.log if isinstance(e, cls)]

    def generations(self) -> list[GenerationAdvanced]:
        return self.of(GenerationAdvanced)

    def completed(self) -> SearchCompleted:
        (done,) = self.of(SearchCompleted)
        return done


def decisions(events: list[Event]) -> list[dict]:
    """Evolver outputs without their wall-clock timestamp."""
    return [
        e.model_dump(mode="json", exclude={"occurred_at"})
        for e in events
        if e.producer == "evolver"
    ]


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
    # 2 baseline runs + 3 (generation 0) + 2 (generation 1, cut to what is left) = 7.
    world = World().run(
        search_started(generations=5, ideas_per_generation=3, budgets=Budgets(max_runs=7))
    )
    assert [ga.plan.fresh + ga.plan.explore + ga.plan.exploit for ga in world.generations()] == [
        3,
        2,
    ]
    assert world.completed().reason == "budget spent: runs (7 of 7)"
    searched = [e for e in world.of(RunCompleted) if e.purpose == "search"]
    assert len(searched) == 5 and [
        r.seed for r in world.of(RunRequested) if r.purpose == "baseline"
    ][:2] == [7, 8]


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


# ---------------------------------------------------------------------------- final re-evaluation


def test_final_re_evaluation_reports_ci_and_p_value() -> None:
    world = World(gpu_seconds=1.0).run(
        search_started(generations=2, ideas_per_generation=5, final_top_k=2, final_seeds=3)
    )
    state, done = world.state, world.completed()
    top_two = [idea_id for idea_id, _ in state.ranked_ideas()[:2]]
    reevals = [e for e in world.of(RunRequested) if e.purpose == "reeval"]
    assert sorted((r.idea_id, r.seed) for r in reevals) == sorted(
        (i, s) for i in top_two for s in (7, 8, 9)
    )
    assert all(r.diff == f"diff for {r.idea_id}\n" and r.patch_id for r in reevals)
    # Baseline on the final seeds: 7 and 8 exist from the start, only seed 9 is new.
    assert [r.seed for r in world.of(RunRequested) if r.purpose == "baseline"] == [7, 8, 9]
    baseline_scores = [default_loss(None, s) for s in (7, 8, 9)]
    assert done.baseline_score == pytest.approx(sum(baseline_scores) / 3)
    assert [f.idea_id for f in done.final] == top_two
    for evaluation in done.final:
        scores = [default_loss(evaluation.idea_id, s) for s in (7, 8, 9)]
        interval = mean_ci(scores)
        assert evaluation.scores == pytest.approx(scores)
        assert (evaluation.mean, evaluation.ci95_low, evaluation.ci95_high) == pytest.approx(
            (interval.mean, interval.low, interval.high)
        )
        assert evaluation.ci95_low < evaluation.mean < evaluation.ci95_high
        assert evaluation.p_value_vs_baseline == pytest.approx(
            welch_t_test(scores, baseline_scores).p_value
        )
    assert done.best_idea_id == top_two[0] and done.best_score == pytest.approx(done.final[0].mean)
    assert done.reason == "completed 2 generations"
    assert done.totals.ideas == 10 and done.totals.patches == 10
    assert done.totals.runs == 2 + 10 + 6 + 1 and done.totals.gpu_seconds == pytest.approx(19.0)
    assert len(world.of(SearchCompleted)) == 1
    assert world.tick().log[-1] == done  # nothing happens after the end


def test_final_baseline_runs_on_the_final_split_when_the_manifest_has_one() -> None:
    world = World(manifest_=manifest(final_split="test")).run(
        search_started(generations=1, ideas_per_generation=3, final_top_k=1, final_seeds=2)
    )
    unpatched = [r for r in world.of(RunRequested) if r.idea_id is None]
    assert [(r.purpose, r.seed) for r in unpatched] == [
        ("baseline", 7),
        ("baseline", 8),
        ("reeval", 7),
        ("reeval", 8),
    ]
    assert world.completed().final[0].p_value_vs_baseline is not None


def test_nothing_to_re_evaluate_still_completes() -> None:
    world = World(fail_patch=lambda idea_id: True).run(
        search_started(generations=2, ideas_per_generation=2)
    )
    done = world.completed()
    assert done.reason == "completed 2 generations; no idea produced a result to re-evaluate"
    assert (
        done.final == []
        and done.best_idea_id is None
        and done.baseline_score == pytest.approx(3.025)
    )


# ---------------------------------------------------------------------------- on the bus


async def test_two_replicas_and_a_restart_on_a_real_broker(settings) -> None:
    """run() wiring: two evolver replicas share the durable consumer (each folds what the
    other consumed), are stopped after generation 1 opens, and a fresh one rebuilds from the
    log and finishes; every generation is advanced exactly once."""
    import asyncio

    from groundloop.bus import Bus
    from groundloop.consumer import consume
    from groundloop.evolver.service import EvolverLoop, run

    bus = await Bus.connect(settings, name="test")
    world = World()  # only its reactions: the ideator, implementer and runners
    stop_world, stop_first, stop_second = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen: dict[str, asyncio.Event] = {
        "GenerationAdvanced.1": asyncio.Event(),
        "SearchCompleted": asyncio.Event(),
    }

    async def watch(msg) -> None:
        kind = ".".join(msg.subject.split(".")[2:4])
        for key, flag in seen.items():
            if kind.startswith(key):
                flag.set()

    await bus.nc.subscribe(f"{settings.subject_prefix}.{SEARCH}.>", cb=watch)

    async def react(event: Event, delivery) -> list[Event]:
        return world.react(event)

    def replica() -> Deps:
        return Deps(environments=lambda name: manifest())

    tasks = [
        asyncio.create_task(consume(bus, "world", [bus.subject_filter()], react, stop=stop_world))
    ]
    tasks += [
        asyncio.create_task(run(settings, stop_first, tick_s=0.2, deps=replica())) for _ in range(2)
    ]
    try:
        await bus.publish(search_started(generations=3, ideas_per_generation=3, final_seeds=2))
        await asyncio.wait_for(seen["GenerationAdvanced.1"].wait(), 60)
        stop_first.set()
        await asyncio.wait_for(asyncio.gather(*tasks[1:]), 30)
        restarted = replica()
        tasks.append(asyncio.create_task(run(settings, stop_second, tick_s=0.2, deps=restarted)))
        await asyncio.wait_for(seen["SearchCompleted"].wait(), 60)
    finally:
        for flag in (stop_world, stop_first, stop_second):
            flag.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    log = [event async for event in bus.events(SEARCH)]
    assert [e.generation for e in log if isinstance(e, GenerationAdvanced)] == [0, 1, 2]
    requested = [e.run_id for e in log if isinstance(e, RunRequested)]
    assert (
        len(requested) == len(set(requested)) == 2 + 2 * 2
    )  # baseline (7, 8) + top 2 × seeds 7, 8
    (done,) = [e for e in log if isinstance(e, SearchCompleted)]
    assert len(done.final) == 2 and all(len(f.scores) == 2 for f in done.final)
    assert restarted.states[SEARCH] == SearchState.fold(
        log
    )  # the restarted replica's state is the log's
    rebuilt = Deps(environments=lambda name: manifest())
    await EvolverLoop(bus, rebuilt).rebuild()  # a later start-up decides nothing new
    assert [e.event_id async for e in bus.events(SEARCH)] == [e.event_id for e in log]
    await bus.close()
