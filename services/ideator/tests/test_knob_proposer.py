"""The knob proposer: labelled, deterministic, distinct ideas; explore away from the context;
exploit toward the optimum on the real synthetic environment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.execution.environment import Environment, execute
from groundloop.ideator.history import SearchHistory
from groundloop.ideator.knobs import KnobProposer
from groundloop.ideator.service import IdeatorDeps, propose
from groundloop.implementer.service import ImplementerDeps
from groundloop.implementer.service import handle as implement
from groundloop.llm.client import ClientCache, LLMSettings
from tests.factories import generation_advanced as advanced
from tests.factories import idea_proposed, run_result, search_started_in


def started_for(
    env: Environment,
    proposer: ev.ProposerSettings,
    *,
    search_id: str = "s1",
    seed: int = 7,
    prices: dict[str, ev.ModelPrice] | None = None,
) -> ev.SearchStarted:
    return search_started_in(
        env,
        search_id,
        seed,
        proposer=proposer,
        price_table=prices,
        generations=5,
        ideas_per_generation=8,
    )


@pytest.fixture
def synthetic() -> Environment:
    return Environment.load("synthetic")


# ---------------------------------------------------------------------------- knob proposer


def knob_deps(history: SearchHistory, env: Environment) -> IdeatorDeps:
    return IdeatorDeps(
        history=history, environment=lambda name: env, llm=ClientCache(LLMSettings())
    )


def test_knob_ideas_are_labelled_deterministic_and_distinct(synthetic):
    started = started_for(synthetic, ev.ProposerSettings(kind="knobs"))
    event = advanced(started, 0, ev.GenerationPlan(fresh=12))
    one = propose(event, knob_deps(SearchHistory.from_events("s1", [started]), synthetic))
    two = propose(event, knob_deps(SearchHistory.from_events("s1", [started]), synthetic))
    assert [e.model_dump(exclude={"occurred_at"}) for e in one.events] == [
        e.model_dump(exclude={"occurred_at"}) for e in two.events
    ]
    assert len(one.events) == 12 and one.dropped == 0
    assert all(
        e.proposer == ev.ProposerInfo(kind="knobs") and e.usage == ev.Usage() for e in one.events
    )
    assert all("no language model" in e.text for e in one.events)
    settings = [json.dumps(e.knobs, sort_keys=True) for e in one.events]
    assert len(set(settings)) == 12 and all(e.knobs for e in one.events)
    for e in one.events:
        for name, value in e.knobs.items():
            knob = synthetic.manifest.knob(name)
            if knob.type in ("float", "int"):
                assert knob.low <= value <= knob.high
    lr = next(e for e in one.events if "LEARNING_RATE" in e.knobs)
    assert (
        f"the learning rate (LEARNING_RATE) from 0.001 to {lr.knobs['LEARNING_RATE']:.3g}"
        in lr.text
    )
    other_seed = started_for(synthetic, ev.ProposerSettings(kind="knobs"), seed=8)
    three = propose(
        advanced(other_seed, 0, ev.GenerationPlan(fresh=12)),
        knob_deps(SearchHistory.from_events("s1", [other_seed]), synthetic),
    )
    assert [e.knobs for e in three.events] != [e.knobs for e in one.events]


def test_knob_explore_stays_away_from_context(synthetic):
    started = started_for(synthetic, ev.ProposerSettings(kind="knobs"))
    history = SearchHistory.from_events("s1", [started])
    proposer = KnobProposer(synthetic.manifest, history, seed=1, generation=1)
    crowded = [{"LEARNING_RATE": 0.01 * (1 + i / 10), "MOMENTUM": 0.9} for i in range(5)]
    past = [
        idea_proposed("s1", i, idea_id=f"p{i}", title="t", text="t", knobs=k)
        for i, k in enumerate(crowded)
    ]
    for p in past:
        history.apply(p)
    explore = KnobProposer(synthetic.manifest, history, seed=1, generation=1).propose(
        0, "explore", [p.idea_id for p in past]
    )
    space = proposer.space
    gap = min(space.distance(space.full(explore.knobs), space.full(k)) for k in crowded)
    assert gap > 0.3 and explore.parent_ids == []


def evaluate_idea(
    idea: ev.IdeaProposed, env: Environment, started: ev.SearchStarted, tmp: Path
) -> ev.RunCompleted:
    """Implement (real implementer, pre-flight included) and run by the real run protocol."""
    deps = ImplementerDeps(
        search=lambda _s: started,
        environment=lambda _n: env,
        llm=ClientCache(LLMSettings()),
        work_dir=tmp / "work",
        cache_dir=tmp / "cache",
    )
    [patch] = implement(idea, deps)
    assert isinstance(patch, ev.PatchReady), patch
    workspace = tmp / f"ws-{idea.idea_id}"
    env.materialize(workspace, patch.diff)
    run = execute(
        env, workspace, seed=0, run_dir=tmp / f"run-{idea.idea_id}", cache_dir=tmp / "cache"
    )
    shutil.rmtree(workspace)
    out = run.outcome
    return patch.derive(
        ev.RunCompleted,
        "runner",
        run_id=f"r-{idea.idea_id}",
        patch_id=patch.patch_id,
        idea_id=idea.idea_id,
        generation=idea.generation,
        status=out.status,
        score=out.score,
        reward=out.reward,
        seed=0,
    )


def test_knob_exploit_moves_toward_the_optimum_on_synthetic(synthetic, tmp_path):
    started = started_for(synthetic, ev.ProposerSettings(kind="knobs"), seed=3)
    history = SearchHistory.from_events("s1", [started])
    base_run = execute(
        synthetic,
        synthetic.materialize(tmp_path / "base").path,
        seed=0,
        run_dir=tmp_path / "base-run",
        cache_dir=tmp_path / "cache",
    ).outcome
    history.apply(
        run_result("s1", "base", purpose="baseline", score=base_run.score, reward=base_run.reward)
    )
    best_by_generation = []
    for generation in range(5):
        above = [r.idea_id for r in history.above_baseline()]
        exploit = (
            0 if generation == 0 else min(6, round(6 * min(0.5 + 0.1 * (generation // 2), 0.8)))
        )
        plan = ev.GenerationPlan(
            fresh=6 if generation == 0 else 0,
            explore=0 if generation == 0 else 6 - exploit,
            exploit=exploit,
            exploit_context_ids=above,
            explore_context_ids=[r.idea_id for r in history.proposed()],
        )
        ideas = propose(advanced(started, generation, plan), knob_deps(history, synthetic)).events
        assert len(ideas) == 6
        scores = []
        for idea in ideas:
            history.apply(idea)
            run = evaluate_idea(idea, synthetic, started, tmp_path)
            history.apply(run)
            scores.append(run.score)
        best_by_generation.append(max(s for s in scores if s is not None))
        if generation:
            assert all(e.parent_ids for e in ideas if e.mode == "exploit")
    best = history.ranked()[0]
    print("best by generation", best_by_generation, "best", best.mean_score, best.title)
    assert max(best_by_generation[2:]) > best_by_generation[0]
    assert best.mean_score > base_run.score + 0.15  # defaults score ~0.62, the optimum 1.06
