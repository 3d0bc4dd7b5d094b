"""The dollar budget is checked before every model call, from the search's log: a call that
would take the search past its budget is not made (the ideator keeps what the generation has
and records the shortfall; the implementer rejects the idea)."""

from __future__ import annotations

import json

from groundloop import events as ev
from groundloop.execution.environment import Environment
from groundloop.ideator.history import SearchHistory
from groundloop.ideator.service import IdeatorDeps, handle
from groundloop.llm.client import ClientCache, LLMSettings
from groundloop.llm.pricing import check_dollar_budget, spent_usd
from tests.factories import generation_advanced, search_started_in
from tests.llm_server import FakeLLMServer, Reply

# $1 per token: each scripted call (100 in, 50 out) costs $150.
PRICE = {"openai:gpt-budget": ev.ModelPrice(input_per_mtok=1e6, output_per_mtok=1e6)}


TOPICS = [
    ("Cosine decay", "Decay the learning rate along a cosine so late steps refine the optimum."),
    ("Heavier momentum", "Raise momentum to 0.95 so the optimiser keeps its heading longer."),
    ("Wider hidden layer", "Double the hidden width for capacity the budget can still afford."),
]


def one_idea(i: int) -> str:
    title, text = TOPICS[int(i)]
    return json.dumps(
        {"ideas": [{"title": title, "experiment": text, "code_changes": f"Edit config: {title}."}]}
    )


def started_with(env: Environment, dollars: float | None) -> ev.SearchStarted:
    started = search_started_in(
        env,
        "budget-1",
        proposer=ev.ProposerSettings(kind="llm", model="openai:gpt-budget", ideas_per_call=1),
        generations=3,
        ideas_per_generation=3,
    )
    budgets = started.config.budgets.model_copy(update={"dollars": dollars})
    config = started.config.model_copy(update={"budgets": budgets})
    return started.model_copy(update={"config": config, "price_table": PRICE})


def ideate(server: FakeLLMServer, started: ev.SearchStarted, env: Environment, earlier=()):
    logged = [started, *earlier]
    deps = IdeatorDeps(
        history=SearchHistory.from_events(started.search_id, logged),
        environment=lambda name: env,
        llm=ClientCache(  # type: ignore[arg-type]
            LLMSettings(
                openai_api_key="k",
                openai_base_url=server.openai_base_url,
                backoff_initial_s=0.01,
                check_model_name=False,
            )
        ),
        spent_usd=spent_usd(logged),
        ideator_calls=sum(e.usage.calls for e in earlier if isinstance(e, ev.IdeaProposed)),
        ideator_usd=sum(e.usage.cost_usd for e in earlier if isinstance(e, ev.IdeaProposed)),
    )
    return handle(generation_advanced(started, 0, ev.GenerationPlan(fresh=3)), deps)


def test_a_call_that_would_pass_the_budget_is_not_made():
    env = Environment.load("synthetic")
    with FakeLLMServer() as server:
        server.enqueue(*(Reply(text=one_idea(i)) for i in range(3)))
        out = ideate(server, started_with(env, dollars=400.0), env)  # room for 2 calls, not 3
        calls = len(server.requests)
    ideas = [e for e in out if isinstance(e, ev.IdeaProposed)]
    assert calls == 2 and len(ideas) == 2
    assert sum(e.usage.cost_usd for e in ideas) == 300.0  # never past the $400 budget
    (short,) = [e for e in out if isinstance(e, ev.IdeasShortfall)]
    assert short.planned == 3 and short.proposed == 2
    assert "dollar budget spent" in short.reason and "--dollars" in short.reason


def test_spend_already_in_the_log_counts():
    env = Environment.load("synthetic")
    started = started_with(env, dollars=400.0)
    with FakeLLMServer() as server:
        server.enqueue(*(Reply(text=one_idea(i)) for i in range(3)))
        first = [e for e in ideate(server, started, env) if isinstance(e, ev.IdeaProposed)]
        before = len(server.requests)
        # A later generation (or a restarted replica) reads the same spend back from the log.
        again = ideate(server, started, env, earlier=first)
        assert len(server.requests) == before  # $300 spent, the next call is expected at $150
    assert not [e for e in again if isinstance(e, ev.IdeaProposed)]
    assert [e for e in again if isinstance(e, ev.IdeasShortfall)]


def test_without_a_dollar_budget_every_call_is_made():
    env = Environment.load("synthetic")
    with FakeLLMServer() as server:
        server.enqueue(*(Reply(text=one_idea(i)) for i in range(3)))
        out = ideate(server, started_with(env, dollars=None), env)
        assert len(server.requests) == 3
    assert len([e for e in out if isinstance(e, ev.IdeaProposed)]) == 3


def test_the_check_itself_names_the_spend_and_the_flag():
    check_dollar_budget(None, 1e9, 1e9)  # no budget: never refused
    check_dollar_budget(10.0, 4.0, 6.0)  # exactly at the budget is allowed
    try:
        check_dollar_budget(10.0, 4.0, 6.5)
    except Exception as exc:  # noqa: BLE001 - the type is asserted below
        assert type(exc).__name__ == "DollarBudgetSpent"
        assert "$4.0000 of $10.0000" in str(exc) and "--dollars" in str(exc)
    else:
        raise AssertionError("a call past the budget was allowed")
