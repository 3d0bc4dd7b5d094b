"""The ideator against a local OpenAI-compatible server: structured output requested, a call
short of ideas followed by calls for the missing ones, IdeasShortfall when they stay missing,
and SearchStopped (not a retry) when the model cannot be reached or is not served."""

from __future__ import annotations

import json
import time

import pytest

from groundloop import events as ev
from groundloop.execution.environment import Environment
from groundloop.ideator.history import SearchHistory
from groundloop.ideator.service import IdeatorDeps, handle
from groundloop.llm.client import ClientCache, LLMSettings
from tests.factories import generation_advanced as advanced
from tests.factories import search_started_in
from tests.llm_replay_server import ReplayServer, refused_url
from tests.llm_server import Reply

MODEL_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"

IDEAS = [
    {
        "title": "Cosine schedule",
        "experiment": "Decay the learning rate with a cosine schedule so late steps refine.",
        "code_changes": "Set SCHEDULE = 'cosine' in the config.",
    },
    {
        "title": "Higher momentum",
        "experiment": "Raise momentum to 0.9 so the optimiser keeps its direction longer.",
        "code_changes": "Set MOMENTUM = 0.9 in the config.",
    },
    {
        "title": "Wider model",
        "experiment": "Double the hidden width to 64 for more capacity within the budget.",
        "code_changes": "Set WIDTH = 64 in the config.",
    },
]
CHATTER = "I am not sure what to suggest here. Could you tell me more about the task?"


@pytest.fixture
def synthetic() -> Environment:
    return Environment.load("synthetic")


def started_for(env: Environment, model: str, ideas_per_call: int = 10) -> ev.SearchStarted:
    return search_started_in(
        env,
        "s1",
        7,
        proposer=ev.ProposerSettings(kind="llm", model=model, ideas_per_call=ideas_per_call),
        generations=3,
        ideas_per_generation=3,
    )


def deps_for(started: ev.SearchStarted, env: Environment, **settings: object) -> IdeatorDeps:
    values: dict[str, object] = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, **settings}
    return IdeatorDeps(
        history=SearchHistory.from_events(started.search_id, [started]),
        environment=lambda name: env,
        llm=ClientCache(LLMSettings(**values)),  # type: ignore[arg-type]
    )


def ideas_json(*picked: dict) -> str:
    return json.dumps({"ideas": list(picked)})


def test_a_short_answer_is_followed_by_a_call_for_the_missing_ideas(synthetic):
    with ReplayServer(models=[MODEL_NAME]) as server:
        server.enqueue(Reply(text=ideas_json(IDEAS[0])), Reply(text=ideas_json(*IDEAS[1:])))
        started = started_for(synthetic, f"openai-compatible:{MODEL_NAME}@{server.openai_base_url}")
        out = handle(advanced(started, 0, ev.GenerationPlan(fresh=3)), deps_for(started, synthetic))
        bodies = [r.body for r in server.requests]
    assert [e.title for e in out if isinstance(e, ev.IdeaProposed)] == [i["title"] for i in IDEAS]
    assert not [e for e in out if isinstance(e, ev.IdeasShortfall)]
    assert len(bodies) == 2
    assert all(b["response_format"]["json_schema"]["name"] == "ideas" for b in bodies)
    first, second = (b["messages"][-1]["content"] for b in bodies)
    assert "3 ideas" in first and "2 ideas" in second  # the re-ask asks for the missing two
    assert "Cosine schedule" in second  # and lists what this round already wrote


def test_ideas_still_missing_after_the_re_asks_are_reported_as_a_shortfall(synthetic):
    with ReplayServer(models=[MODEL_NAME]) as server:
        template_echo = {
            "title": "Idea",
            "experiment": "one paragraph: what to change and why it should help",
            "code_changes": "the concrete edits to the editable files",
        }
        server.enqueue(Reply(text=ideas_json(IDEAS[0], template_echo)))
        server.responder = lambda request: Reply(text=CHATTER)
        started = started_for(synthetic, f"openai-compatible:{MODEL_NAME}@{server.openai_base_url}")
        cause = advanced(started, 0, ev.GenerationPlan(fresh=3))
        out = handle(cause, deps_for(started, synthetic))
        calls = len(server.requests)
    ideas = [e for e in out if isinstance(e, ev.IdeaProposed)]
    (shortfall,) = [e for e in out if isinstance(e, ev.IdeasShortfall)]
    assert [i.title for i in ideas] == ["Cosine schedule"]
    assert calls == 3  # ceil(3 / 10) + 2 extra calls, then it gives up
    assert (shortfall.generation, shortfall.planned, shortfall.proposed) == (0, 3, 1)
    assert "3 model call(s)" in shortfall.reason
    assert "2 without a parsable idea" in shortfall.reason
    assert "1 idea(s) rejected as template echoes" in shortfall.reason
    assert shortfall.causation_id == cause.event_id
    assert shortfall.subject().endswith(".IdeasShortfall.0")
    # A redelivery re-derives the same ids: the log keeps one of each.
    with ReplayServer(models=[MODEL_NAME]) as again:
        again.enqueue(Reply(text=ideas_json(IDEAS[0])))
        again.responder = lambda request: Reply(text=CHATTER)
        started2 = started.model_copy(
            update={
                "proposer": ev.ProposerSettings(
                    kind="llm", model=f"openai-compatible:{MODEL_NAME}@{again.openai_base_url}"
                )
            }
        )
        repeat = handle(cause, deps_for(started2, synthetic))
    assert [e.event_id for e in repeat] == [e.event_id for e in out]


def test_a_server_refusing_connections_stops_the_search_at_once(synthetic):
    url = refused_url()
    started = started_for(synthetic, f"openai-compatible:{MODEL_NAME}@{url}")
    begun = time.monotonic()
    out = handle(
        advanced(started, 0, ev.GenerationPlan(fresh=3)),
        deps_for(started, synthetic, max_attempts=6, max_total_s=60),
    )
    took = time.monotonic() - begun
    (stopped,) = out
    assert isinstance(stopped, ev.SearchStopped)
    assert stopped.stage == "ideator" and stopped.error_type == "LLMUnreachable"
    assert url in stopped.reason
    assert "refused" in stopped.reason.lower()  # the OS error, as the OS words it
    assert took < 5  # no backoff: a refused connection is not worth retrying
    assert stopped.event_id == ev.stable_id("SearchStopped", "s1", "ideator")


def test_a_model_the_server_does_not_serve_stops_the_search_naming_the_served_ones(synthetic):
    with ReplayServer(models=[MODEL_NAME]) as server:
        started = started_for(synthetic, f"openai-compatible:qwen-typo@{server.openai_base_url}")
        out = handle(advanced(started, 0, ev.GenerationPlan(fresh=2)), deps_for(started, synthetic))
        chat_calls = len(server.requests)
    (stopped,) = out
    assert isinstance(stopped, ev.SearchStopped) and stopped.error_type == "ModelNotServed"
    assert "qwen-typo" in stopped.reason and MODEL_NAME in stopped.reason
    assert chat_calls == 0  # found out from the model list, before any generation


def test_a_generation_redelivered_after_the_search_stopped_calls_no_model(settings, synthetic):
    """The retried GenerationAdvanced of a stopped search is acknowledged and does nothing:
    the log (a real broker) has its SearchStopped."""
    import asyncio

    from groundloop.bus import Bus
    from groundloop.ideator.service import IdeatorContext, on_generation

    with ReplayServer(models=[MODEL_NAME]) as server:
        server.responder = lambda request: Reply(text=ideas_json(*IDEAS))
        started = started_for(synthetic, f"openai-compatible:{MODEL_NAME}@{server.openai_base_url}")
        cause = advanced(started, 0, ev.GenerationPlan(fresh=3))
        stop = ev.SearchStopped(
            search_id=started.search_id,
            producer="implementer",
            stage="implementer",
            reason="cannot reach the model server",
        )

        async def go() -> list[ev.Event]:
            bus = await Bus.connect(settings, "test-ideator")
            try:
                for event in (started, cause, stop):
                    await bus.publish(event)
                ctx = IdeatorContext(bus, settings, ClientCache(LLMSettings()))
                return await on_generation(cause, None, ctx)  # type: ignore[arg-type]
            finally:
                await bus.close()

        out = asyncio.run(go())
        calls = len(server.requests)
    assert out == [] and calls == 0
