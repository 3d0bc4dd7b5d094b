"""The ideator: parsing, duplicates, LLM prompts through a local model server, knob proposer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.execution.environment import Environment, execute
from groundloop.ideator.history import SearchHistory
from groundloop.ideator.knobs import KnobProposer
from groundloop.ideator.parsing import DuplicateFilter, parse_ideas
from groundloop.ideator.service import IdeatorDeps, propose, split_usage
from groundloop.implementer.service import ImplementerDeps
from groundloop.implementer.service import handle as implement
from groundloop.llm.client import ClientCache, LLMSettings, MissingAPIKey
from groundloop.llm.pricing import add_usage
from tests.llm_server import FakeLLMServer, Reply

SECRET = "sk-ideator-test"


IDEAS = {
    "label smoothing": (
        "Train with label smoothing of 0.1 so the model is less overconfident on frequent bytes.",
        "Pass label_smoothing=0.1 to cross_entropy in train.py.",
    ),
    "weight tying": (
        "Tie the input embedding and output projection weights, which halves those "
        "parameters and usually helps small language models.",
        "Set lm_head.weight = wte.weight after building the model.",
    ),
    "sparse attention": (
        "Restrict attention to a local window of 32 tokens to spend compute on more steps.",
        "Mask scores outside the window in CausalSelfAttention.",
    ),
    "mixture of experts": (
        "Replace each MLP with two experts and a top-1 router for more capacity at equal cost.",
        "Add a Router module and two MLPs per block.",
    ),
    "stochastic depth": (
        "Randomly skip residual blocks with probability 0.1 during training as regularisation.",
        "Wrap each block call in a Bernoulli skip.",
    ),
}


def idea_text(topic: str) -> str:
    experiment, changes = IDEAS[topic]
    return f"[Experiment] {experiment}\n[Code Changes] {changes}\n[End]\n"


# ---------------------------------------------------------------------------- parsing


def test_bracket_format_with_chatter_markdown_and_missing_end():
    text = (
        "Sure! Here are my ideas.\n\n**[Experiment]** Use a cosine schedule with warmup. It "
        "stabilises early training.\n**[Code Changes]** Set LR_SCHEDULE = 'cosine'.\n"
        "[Experiment 2] Increase the batch size to 32 for smoother gradients.\n"
        "[Code Changes] BATCH_SIZE = 32\n[End]\n[Experiment] too short\n[Code Changes] x\n[End]\n"
        "[Experiment] An idea with no code changes section at all, which is malformed.\n"
        "Hope this helps!"
    )
    ideas = parse_ideas(text)
    assert [i.title for i in ideas] == [
        "Use a cosine schedule with warmup.",
        "Increase the batch size to 32 for smoother gradients.",
    ]
    assert ideas[0].code_changes == "Set LR_SCHEDULE = 'cosine'."
    assert ideas[1].text.startswith("[Experiment] Increase the batch size")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda items: "Here you go:\n```json\n" + json.dumps({"ideas": items}) + "\n```\nDone.",
        lambda items: "chatter [not json] " + json.dumps(items) + " trailing",
        lambda items: json.dumps({"ideas": items}, indent=2),
    ],
)
def test_json_format_tolerates_chatter(wrap):
    items = [
        {
            "title": "Label smoothing",
            "experiment": "Add label smoothing of 0.1 to the loss.",
            "code_changes": "In the loss, use label_smoothing=0.1.",
        },
        {
            "idea": "Use a deeper but narrower model for the same budget.",
            "changes": ["N_LAYER = 6", "N_EMBD = 96"],
        },
        {"title": "broken", "experiment": "short"},
    ]
    ideas = parse_ideas(wrap(items))
    assert [i.title for i in ideas] == [
        "Label smoothing",
        "Use a deeper but narrower model for the same budget.",
    ]
    assert ideas[1].code_changes == "- N_LAYER = 6\n- N_EMBD = 96"


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "I cannot help with that.",
        "{not json",
        "[Code Changes] only\n[End]",
        '{"ideas": "none"}',
        "[1, 2, 3]",
    ],
)
def test_malformed_output_gives_no_ideas(junk):
    assert parse_ideas(junk) == []


def test_duplicate_filter():
    seen = DuplicateFilter([idea_text("label smoothing")], threshold=0.9)
    assert seen.reason(idea_text("label smoothing")) == "exact duplicate"
    reworded = (
        idea_text("label smoothing").replace("Train with", "TRAIN with").replace("bytes.", "bytes!")
    )
    assert seen.reason(reworded) == "exact duplicate"  # normalisation ignores case and punctuation
    near = idea_text("label smoothing").replace("usually", "often").replace("frequent", "common")
    assert seen.reason(near).startswith("near duplicate")
    assert seen.admit(idea_text("weight tying")) is None
    assert seen.admit(idea_text("weight tying")) == "exact duplicate"
    assert seen.admit(idea_text("stochastic depth")) is None


def test_split_usage_adds_up():
    usage = ev.Usage(calls=2, input_tokens=1001, output_tokens=7, cost_usd=0.3)
    shares = split_usage(usage, 3)
    assert sum(s.input_tokens for s in shares) == 1001 and sum(s.output_tokens for s in shares) == 7
    assert sum(s.calls for s in shares) == 2 and sum(s.cost_usd for s in shares) == pytest.approx(
        0.3
    )


def test_history_folds_runs_by_idea_or_patch_and_keeps_baseline_apart():
    started = ev.SearchStarted(
        search_id="h",
        producer="cli",
        environment="synthetic",
        environment_digest="d",
        strategy="evolution",
        config=ev.SearchConfig(generations=1, ideas_per_generation=2),
        proposer=ev.ProposerSettings(kind="knobs"),
        implementer=ev.ImplementerSettings(kind="knobs"),
    )
    a, b = (
        ev.IdeaProposed(
            search_id="h",
            producer="i",
            idea_id=i,
            generation=0,
            mode="fresh",
            title=i,
            text=i,
            proposer=ev.ProposerInfo(kind="knobs"),
            knobs={"WIDTH": 64},
        )
        for i in ("a", "b")
    )
    patch = ev.PatchReady(
        search_id="h",
        producer="impl",
        patch_id="pb",
        idea_id="b",
        generation=0,
        environment="synthetic",
        environment_digest="d",
        diff="",
        diff_digest="x",
        patched_digest="y",
        implementer=ev.ImplementerInfo(kind="knobs"),
        preflight=ev.PreflightReport(passed=True),
    )

    def run(n: int, **fields) -> ev.RunCompleted:
        return ev.RunCompleted(
            search_id="h", producer="r", run_id=f"r{n}", generation=0, seed=0, **fields
        )

    history = SearchHistory.from_events(
        "h",
        [
            started,
            a,
            b,
            patch,
            run(1, idea_id="a", status="succeeded", score=0.7, reward=0.7),
            run(2, patch_id="pb", status="timed_out"),
            run(3, purpose="baseline", status="succeeded", score=0.6, reward=0.6),
            run(4, idea_id="a", purpose="reeval", status="succeeded", score=0.1, reward=0.1),
            run(5, idea_id="a", status="succeeded", score=0.9, reward=0.9),
            ev.PatchFailed(
                search_id="other",
                producer="impl",
                idea_id="a",
                generation=0,
                attempts=1,
                stage="apply",
                last_error="x",
            ),
        ],
    )
    assert history.started == started and history.baseline_score == 0.6
    assert (
        history.ideas["a"].mean_score == pytest.approx(0.8)
        and history.ideas["a"].patch_error is None
    )
    assert history.ideas["b"].outcome == "run timed_out"
    assert [r.idea_id for r in history.above_baseline()] == ["a"]


# ---------------------------------------------------------------------------- helpers


def started_for(
    env: Environment,
    proposer: ev.ProposerSettings,
    *,
    search_id: str = "s1",
    seed: int = 7,
    prices: dict[str, ev.ModelPrice] | None = None,
) -> ev.SearchStarted:
    return ev.SearchStarted(
        event_id=ev.stable_id(search_id, "started"),
        search_id=search_id,
        producer="cli",
        environment=env.name,
        environment_digest=env.digest(),
        strategy="evolution",
        config=ev.SearchConfig(generations=5, ideas_per_generation=8),
        proposer=proposer,
        implementer=ev.ImplementerSettings(kind="knobs"),
        price_table=prices or {},
        seed=seed,
    )


def advanced(
    started: ev.SearchStarted, generation: int, plan: ev.GenerationPlan
) -> ev.GenerationAdvanced:
    return ev.GenerationAdvanced(
        event_id=ev.stable_id(started.search_id, "gen", generation),
        search_id=started.search_id,
        producer="evolver",
        generation=generation,
        plan=plan,
    )


def past_idea(started: ev.SearchStarted, n: int, text: str, title: str) -> ev.IdeaProposed:
    return ev.IdeaProposed(
        search_id=started.search_id,
        producer="ideator",
        idea_id=f"past-{n}",
        generation=0,
        mode="fresh",
        title=title,
        text=text,
        proposer=ev.ProposerInfo(kind="llm", model="openai:gpt-5"),
    )


def completed(
    idea: ev.IdeaProposed, status: str, score: float | None, purpose: str = "search"
) -> ev.RunCompleted:
    return ev.RunCompleted(
        search_id=idea.search_id,
        producer="runner",
        run_id=f"run-{idea.idea_id}-{status}",
        idea_id=idea.idea_id,
        generation=idea.generation,
        purpose=purpose,
        status=status,
        score=score,
        reward=score or 0.0,
        seed=0,
    )


@pytest.fixture
def synthetic() -> Environment:
    return Environment.load("synthetic")


@pytest.fixture
def server():
    with FakeLLMServer() as s:
        yield s


def llm_deps(server: FakeLLMServer, history: SearchHistory, env: Environment) -> IdeatorDeps:
    settings = LLMSettings(
        openai_api_key=SECRET,
        anthropic_api_key=SECRET,
        openai_base_url=server.openai_base_url,
        anthropic_base_url=server.anthropic_base_url,
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
        max_total_s=20,
        timeout_s=10,
        thinking_budget=2048,
    )
    return IdeatorDeps(history=history, environment=lambda name: env, llm=ClientCache(settings))


# ---------------------------------------------------------------------------- LLM proposer


def test_fresh_ideas_from_openai_with_drops_avoid_list_and_costs(server, synthetic):
    prices = {"openai:gpt-5": ev.ModelPrice(input_per_mtok=2.0, output_per_mtok=10.0)}
    started = started_for(
        synthetic, ev.ProposerSettings(kind="llm", model="openai:gpt-5"), prices=prices
    )
    old = past_idea(
        started, 1, parse_ideas(idea_text("label smoothing"))[0].text, "label smoothing"
    )
    history = SearchHistory.from_events("s1", [started, old])
    server.enqueue(
        Reply(
            text="Thinking out loud...\n"
            + idea_text("label smoothing")
            + idea_text("weight tying")
            + idea_text("weight tying"),
            input_tokens=3000,
            output_tokens=600,
        ),
        Reply(
            text=json.dumps(
                {
                    "ideas": [
                        {
                            "title": "Rotary embeddings",
                            "experiment": "Replace learned positions with rotary embeddings.",
                            "code_changes": "Apply RoPE to q and k.",
                        },
                        {
                            "title": "Gradient clipping",
                            "experiment": "Clip gradients at 0.5 instead of 1.0.",
                            "code_changes": "GRAD_CLIP = 0.5",
                        },
                    ]
                }
            ),
            input_tokens=3100,
            output_tokens=400,
        ),
    )
    event = advanced(started, 0, ev.GenerationPlan(fresh=3))
    result = propose(event, llm_deps(server, history, synthetic))

    assert [e.title for e in result.events] == [
        "Tie the input embedding and output projection weights, which halves those parameters and usually…",
        "Rotary embeddings",
        "Gradient clipping",
    ]
    assert result.dropped == 2 and result.unfilled == 0 and result.calls == 2
    assert [e.idea_id for e in result.events] == [ev.stable_id("s1", 0, slot) for slot in range(3)]
    assert [e.event_id for e in result.events] == [
        ev.derive_event_id("ideator", event.event_id, slot) for slot in range(3)
    ]
    assert all(
        e.proposer == ev.ProposerInfo(kind="llm", model="openai:gpt-5") for e in result.events
    )
    assert all(e.mode == "fresh" and e.causation_id == event.event_id for e in result.events)
    total = add_usage(*(e.usage for e in result.events))
    assert (total.calls, total.input_tokens, total.output_tokens) == (2, 6100, 1000)
    assert sum(e.usage.cost_usd for e in result.events) == pytest.approx(
        (6100 * 2 + 1000 * 10) / 1e6
    )
    first, second = server.requests
    prompt = first.body["messages"][-1]["content"]
    assert "Brainstorm 3 diverse ideas" in prompt and "## config.py (editable)" in prompt
    assert (
        "run.py: protected" in prompt and "score = 1 - 0.1" not in prompt
    )  # protected code hidden
    assert "Brainstorm 2 diverse ideas" in second.body["messages"][-1]["content"]
    assert (
        "- Tie the input embedding" in second.body["messages"][-1]["content"]
    )  # written this round
    assert result.events[0].prompt_digest != result.events[1].prompt_digest
    assert SECRET not in "".join(e.model_dump_json() for e in result.events)


def test_explore_and_exploit_prompts_carry_context_and_parents(server, synthetic):
    started = started_for(
        synthetic,
        ev.ProposerSettings(kind="llm", model="anthropic:claude-sonnet-4-5", thinking_budget=1024),
    )
    good = past_idea(started, 1, "[Experiment] momentum 0.9 helps", "Raise momentum to 0.9")
    better = past_idea(started, 2, "[Experiment] a cosine schedule helps", "Cosine schedule")
    broken = past_idea(started, 3, "[Experiment] a broken thing", "Broken idea")
    base = ev.RunCompleted(
        search_id="s1",
        producer="runner",
        run_id="b0",
        generation=0,
        purpose="baseline",
        status="succeeded",
        score=0.62,
        reward=0.62,
        seed=0,
    )
    history = SearchHistory.from_events(
        "s1",
        [
            started,
            good,
            better,
            broken,
            base,
            completed(good, "succeeded", 0.7),
            completed(better, "succeeded", 0.8),
            completed(broken, "failed", None),
        ],
    )
    topics = iter(["mixture of experts", "stochastic depth"])
    server.responder = lambda request: Reply(
        text=idea_text(next(topics)), thinking="hmm", input_tokens=10, output_tokens=5
    )
    plan = ev.GenerationPlan(
        explore=1,
        exploit=1,
        explore_context_ids=["past-1", "past-2", "past-3"],
        exploit_context_ids=["past-1", "past-2"],
    )
    result = propose(advanced(started, 1, plan), llm_deps(server, history, synthetic))

    explore, exploit = result.events
    assert (explore.mode, exploit.mode) == ("explore", "exploit")
    assert explore.parent_ids == [] and exploit.parent_ids == ["past-2", "past-1"]  # best first
    explore_prompt, exploit_prompt = (r.last_user_text for r in server.requests)
    assert (
        "substantially different" in explore_prompt and "Broken idea — run failed" in explore_prompt
    )
    assert "combine or refine" in exploit_prompt and "Broken idea" not in exploit_prompt
    assert exploit_prompt.index("Cosine schedule — score 0.8") < exploit_prompt.index(
        "Raise momentum to 0.9 — score 0.7"
    )
    assert "baseline scores score = 0.62" in exploit_prompt
    assert server.requests[0].body["thinking"] == {
        "type": "enabled",
        "budget_tokens": 1024,
    }  # the search's setting
    assert explore.proposer.model == "anthropic:claude-sonnet-4-5"


def test_malformed_answer_costs_an_extra_call_and_still_counts(server, synthetic):
    started = started_for(synthetic, ev.ProposerSettings(kind="llm", model="openai:gpt-5"))
    history = SearchHistory.from_events("s1", [started])
    server.enqueue(
        Reply(status=500),
        Reply(text="Sorry, I can't do that in this format.", input_tokens=50, output_tokens=5),
        Reply(text=idea_text("sparse attention"), input_tokens=60, output_tokens=6),
    )
    result = propose(
        advanced(started, 0, ev.GenerationPlan(fresh=1)), llm_deps(server, history, synthetic)
    )
    [idea] = result.events
    assert (
        idea.usage.calls == 2 and idea.usage.input_tokens == 110
    )  # the fruitless call is paid for
    assert len(server.requests) == 3  # one retry after the 500


def test_missing_key_is_reported_not_retried(synthetic, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("GROUNDLOOP_OPENAI_API_KEY", raising=False)
    started = started_for(synthetic, ev.ProposerSettings(kind="llm", model="openai:gpt-5"))
    deps = IdeatorDeps(
        history=SearchHistory.from_events("s1", [started]),
        environment=lambda n: synthetic,
        llm=ClientCache(LLMSettings()),
    )
    with pytest.raises(MissingAPIKey, match="OPENAI_API_KEY"):
        propose(advanced(started, 0, ev.GenerationPlan(fresh=1)), deps)


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
        ev.IdeaProposed(
            search_id="s1",
            producer="x",
            idea_id=f"p{i}",
            generation=0,
            mode="fresh",
            title="t",
            text="t",
            proposer=ev.ProposerInfo(kind="knobs"),
            knobs=k,
        )
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
        ev.RunCompleted(
            search_id="s1",
            producer="runner",
            run_id="base",
            generation=0,
            purpose="baseline",
            status="succeeded",
            score=base_run.score,
            reward=base_run.reward,
            seed=0,
        )
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
