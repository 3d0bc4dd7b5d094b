"""The ideator's LLM side: parsing model answers, dropping duplicates, splitting usage, and
the LLM proposer's prompts and costs through a local model server."""

from __future__ import annotations

import json

import pytest

from groundloop import events as ev
from groundloop.execution.environment import Environment
from groundloop.ideator.history import SearchHistory
from groundloop.ideator.service import IdeatorDeps, propose, split_usage
from groundloop.llm.client import ClientCache, LLMSettings, MissingAPIKey
from groundloop.llm.duplicates import DuplicateFilter
from groundloop.llm.idea_parsing import parse_ideas
from groundloop.llm.pricing import add_usage
from tests.factories import generation_advanced as advanced
from tests.factories import idea_proposed, run_of_idea, run_result, search_started_in
from tests.llm_server import FakeLLMServer, Reply, fast_settings

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


def past_idea(started: ev.SearchStarted, n: int, text: str, title: str) -> ev.IdeaProposed:
    return idea_proposed(
        started.search_id,
        n,
        idea_id=f"past-{n}",
        title=title,
        text=text,
        proposer=ev.ProposerInfo(kind="llm", model="openai:gpt-5"),
    )


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


@pytest.fixture
def synthetic() -> Environment:
    return Environment.load("synthetic")


@pytest.fixture
def server():
    with FakeLLMServer() as s:
        yield s


def llm_deps(server: FakeLLMServer, history: SearchHistory, env: Environment) -> IdeatorDeps:
    settings = fast_settings(server, SECRET, backoff_max_s=0.02, thinking_budget=2048)
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
    base = run_result("s1", "b0", purpose="baseline", score=0.62)
    history = SearchHistory.from_events(
        "s1",
        [
            started,
            good,
            better,
            broken,
            base,
            run_of_idea(good, "succeeded", 0.7),
            run_of_idea(better, "succeeded", 0.8),
            run_of_idea(broken, "failed", None),
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
