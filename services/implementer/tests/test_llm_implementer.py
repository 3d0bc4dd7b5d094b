"""The implementer's LLM path through a local model server: patch formats, the revision loop,
parallel samples, and a provider that is down or a key that is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment
from groundloop.implementer.llm_patch import extract_patch
from groundloop.implementer.service import ImplementerDeps, handle
from groundloop.llm.client import ClientCache, LLMError, LLMSettings
from tests.factories import idea_proposed as an_idea
from tests.factories import search_started_in
from tests.llm_server import FakeLLMServer, Reply, fast_settings

SECRET = "sk-implementer-test"


@pytest.fixture
def synthetic() -> Environment:
    return Environment.load("synthetic")


@pytest.fixture
def server():
    with FakeLLMServer() as s:
        yield s


def started_for(
    env: Environment,
    implementer: ev.ImplementerSettings | None = None,
    search_id: str = "s1",
    prices: dict | None = None,
) -> ev.SearchStarted:
    return search_started_in(
        env,
        search_id,
        1,
        implementer=implementer,
        price_table=prices,
        generations=2,
        ideas_per_generation=4,
    )


def make_deps(
    tmp: Path, env: Environment, started: ev.SearchStarted, server: FakeLLMServer, **overrides
) -> ImplementerDeps:
    values = dict(
        search=lambda _s: started,
        environment=lambda _n: env,
        llm=ClientCache(fast_settings(server, SECRET, backoff_max_s=0.02, max_attempts=2)),
        work_dir=tmp / "work",
        cache_dir=tmp / "cache",
    )
    return ImplementerDeps(**{**values, **overrides})


def config_diff(env: Environment, old: str, new: str) -> str:
    text = env.editable_sources()["config.py"]
    assert old in text
    return make_diff({"config.py": text}, {"config.py": text.replace(old, new)})


def test_llm_idea_without_a_model_fails_clearly(tmp_path, synthetic, server):
    [failed] = handle(an_idea(), make_deps(tmp_path, synthetic, started_for(synthetic), server))
    assert failed.stage == "model" and "implementer kind 'llm'" in failed.last_error


# ---------------------------------------------------------------------------- the LLM path


def test_extract_patch_formats(synthetic):
    sources = synthetic.editable_sources()
    diff = config_diff(synthetic, "MOMENTUM = 0.5", "MOMENTUM = 0.8")
    assert extract_patch(f"Here is the patch:\n```diff\n{diff}```\nThat's it.", sources) == diff
    assert extract_patch(diff, sources) == diff
    blocks = "config.py\n<<<<<<< SEARCH\nMOMENTUM = 0.5  # 0 .. 0.99\n=======\nMOMENTUM = 0.8  # 0 .. 0.99\n>>>>>>> REPLACE\n"
    assert extract_patch("Sure.\n" + blocks, sources) == diff
    with pytest.raises(Exception, match="no unified diff"):
        extract_patch("I changed the momentum for you.", sources)


def test_revision_loop_apply_error_then_preflight_error_then_success(tmp_path, synthetic, server):
    prices = {"openai:gpt-5": ev.ModelPrice(input_per_mtok=1.0, output_per_mtok=10.0)}
    started = started_for(
        synthetic,
        ev.ImplementerSettings(kind="llm", model="openai:gpt-5", samples=1, revisions=2),
        prices=prices,
    )
    stale_context = (
        "```diff\n--- a/config.py\n+++ b/config.py\n@@ -6,2 +6,2 @@\n-LEARNING_RATE = 3e-4\n"
        "+LEARNING_RATE = 1e-2\n MOMENTUM = 0.5  # 0 .. 0.99\n```\n"
    )
    crashes = (
        "config.py\n<<<<<<< SEARCH\nLEARNING_RATE = 1e-3  # step size (log scale, 1e-4 .. 1e-1)\n=======\n"
        "LEARNING_RATE = -1.0\n>>>>>>> REPLACE\n"
    )
    good = (
        "```diff\n" + config_diff(synthetic, "LEARNING_RATE = 1e-3", "LEARNING_RATE = 1e-2") + "```"
    )
    server.enqueue(
        Reply(text=stale_context, input_tokens=1000, output_tokens=100),
        Reply(text=crashes, input_tokens=1500, output_tokens=80),
        Reply(text="Fixed:\n" + good, input_tokens=2000, output_tokens=90),
    )
    [patch] = handle(an_idea(), make_deps(tmp_path, synthetic, started, server))

    assert isinstance(patch, ev.PatchReady) and patch.attempts == 3
    assert patch.implementer == ev.ImplementerInfo(kind="llm", model="openai:gpt-5")
    assert (patch.usage.calls, patch.usage.input_tokens, patch.usage.output_tokens) == (
        3,
        4500,
        270,
    )
    assert patch.usage.cost_usd == pytest.approx((4500 * 1 + 270 * 10) / 1e6)
    assert "+LEARNING_RATE = 1e-2" in patch.diff and patch.preflight.passed
    first, second, third = (r.body["messages"] for r in server.requests)
    prompt = next(m["content"] for m in first if m["role"] == "user")
    assert "## config.py (editable)" in prompt and "run.py: protected" in prompt
    assert "def score(" not in prompt  # the protected evaluation is never shown
    assert (
        "could not be applied" in second[-1]["content"]
        and "LEARNING_RATE = 3e-4" in second[-1]["content"]
    )
    assert second[-2] == {"role": "assistant", "content": stale_context}
    assert "failed pre-flight" in third[-1]["content"] and "smoke" in third[-1]["content"]
    assert (
        "math domain error" in third[-1]["content"]
    )  # the smoke run's traceback reaches the model


def test_revisions_exhausted_give_patch_failed_with_the_last_error(tmp_path, synthetic, server):
    started = started_for(
        synthetic,
        ev.ImplementerSettings(
            kind="llm", model="anthropic:claude-sonnet-4-5", samples=1, revisions=1
        ),
    )
    protected = "```diff\n--- a/run.py\n+++ b/run.py\n@@ -1 +1 @@\n-x\n+y\n```"
    escape = "```diff\n--- a/../outside.py\n+++ b/../outside.py\n@@ -0,0 +1 @@\n+pwned = 1\n```"
    server.enqueue(Reply(text=protected), Reply(text=escape))
    [failed] = handle(an_idea(), make_deps(tmp_path, synthetic, started, server))
    assert isinstance(failed, ev.PatchFailed) and failed.stage == "apply" and failed.attempts == 2
    assert "'..'" in failed.last_error and failed.usage.calls == 2
    assert "run.py is protected" in server.requests[1].last_user_text
    assert (
        not (tmp_path / "outside.py").exists() and not (tmp_path / "work" / "outside.py").exists()
    )


def test_parallel_samples_first_passing_wins_and_all_calls_are_paid(tmp_path, synthetic, server):
    started = started_for(
        synthetic, ev.ImplementerSettings(kind="llm", model="openai:gpt-5", samples=3, revisions=1)
    )
    good = "```diff\n" + config_diff(synthetic, "WIDTH = 32", "WIDTH = 128") + "```"
    answers = iter([Reply(text="no idea"), Reply(text=good), Reply(text=good)])
    server.responder = lambda request: next(answers, Reply(text=good))
    [patch] = handle(an_idea(), make_deps(tmp_path, synthetic, started, server))
    assert isinstance(patch, ev.PatchReady) and "+WIDTH = 128" in patch.diff
    assert patch.usage.calls == len(server.requests) >= 2
    assert 2 <= patch.attempts <= 6


def test_provider_down_is_retried_later_and_missing_key_fails(
    tmp_path, synthetic, server, monkeypatch
):
    started = started_for(
        synthetic, ev.ImplementerSettings(kind="llm", model="openai:gpt-5", samples=2, revisions=1)
    )
    server.responder = lambda request: Reply(status=503)
    with pytest.raises(LLMError, match="gave up") as info:
        handle(an_idea(), make_deps(tmp_path, synthetic, started, server))
    assert info.value.retryable  # run() naks the idea for a later delivery
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("GROUNDLOOP_OPENAI_API_KEY", raising=False)
    deps = make_deps(tmp_path, synthetic, started, server, llm=ClientCache(LLMSettings()))
    [failed] = handle(an_idea(), deps)
    assert failed.stage == "model" and "export OPENAI_API_KEY" in failed.last_error


def test_a_model_idea_past_the_dollar_budget_calls_no_model(tmp_path, synthetic, server):
    """The search's spend (read from its log by the service) plus what a patch has cost on
    average would pass the budget: the idea is rejected before any model call."""
    started = started_for(
        synthetic, ev.ImplementerSettings(kind="llm", model="openai:gpt-4o"), "budget-s"
    )
    budgets = started.config.budgets.model_copy(update={"dollars": 1.0})
    started = started.model_copy(
        update={"config": started.config.model_copy(update={"budgets": budgets})}
    )
    deps = make_deps(tmp_path, synthetic, started, server, spent_usd=0.9, next_call_usd=0.2)
    [failed] = handle(an_idea(search_id="budget-s"), deps)
    assert isinstance(failed, ev.PatchFailed) and failed.stage == "rejected"
    assert "dollar budget spent" in failed.last_error and not server.requests
    # With room for the next patch the same idea goes to the model.
    server.enqueue(Reply(text="no diff here"))
    deps = make_deps(tmp_path, synthetic, started, server, spent_usd=0.5, next_call_usd=0.2)
    handle(an_idea(search_id="budget-s"), deps)
    assert server.requests


def test_each_model_call_of_an_idea_is_checked_against_the_dollar_budget(
    tmp_path, synthetic, server
):
    """$1 per token for gpt-4o here: each scripted call (100 + 50 tokens) costs $150. With
    $400 left, two calls are made (the third would be expected to pass the budget) and the
    idea is rejected saying so, although it had revisions left."""
    prices = {"openai:gpt-4o": ev.ModelPrice(input_per_mtok=1e6, output_per_mtok=1e6)}
    settings = ev.ImplementerSettings(kind="llm", model="openai:gpt-4o", samples=1, revisions=3)
    started = started_for(synthetic, settings, "budget-c", prices=prices)
    budgets = started.config.budgets.model_copy(update={"dollars": 400.0})
    started = started.model_copy(
        update={"config": started.config.model_copy(update={"budgets": budgets})}
    )
    server.responder = lambda request: Reply(text=f"no patch {len(server.requests)}")
    [failed] = handle(
        an_idea(search_id="budget-c"), make_deps(tmp_path, synthetic, started, server)
    )
    assert len(server.requests) == 2
    assert isinstance(failed, ev.PatchFailed) and failed.stage == "rejected"
    assert "dollar budget spent: $300.0000 of $400.0000" in failed.last_error
    assert failed.usage.cost_usd == 300.0
