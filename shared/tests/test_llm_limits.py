"""Calls that fit the model: unreachable servers and wrong model names fail at once and say
why, output budgets follow the measured speed, timeouts are not retried with the same budget,
calls per endpoint are limited, and structured output is asked for where it is understood.
All against a real HTTP server on localhost speaking the OpenAI wire format."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from groundloop.llm.client import (
    JsonSchema,
    LLMSettings,
    LLMTimeout,
    LLMUnreachable,
    ModelNotServed,
    make_client,
)
from groundloop.llm.limits import RATES, cap_output_tokens, served_name_matches
from tests.llm_replay_server import ReplayServer, Slow, refused_url
from tests.llm_server import Reply

GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def settings(**overrides: Any) -> LLMSettings:
    values: dict[str, Any] = dict(
        backoff_initial_s=5.0,  # a retry would show up as seconds of sleep
        backoff_max_s=5.0,
        timeout_s=10,
        max_total_s=60,
        max_output_tokens=8192,
    )
    values.update(overrides)
    return LLMSettings(**values)


def ask(client, text: str = "hello", **kw):
    return client.complete([{"role": "user", "content": text}], **kw)


@pytest.fixture
def server():
    with ReplayServer(models=[GGUF]) as s:
        yield s


def test_a_server_that_refuses_connections_fails_at_once_naming_url_and_os_error():
    url = refused_url()
    client = make_client(f"openai-compatible:{GGUF}@{url}", settings())
    began = time.monotonic()
    with pytest.raises(LLMUnreachable) as caught:
        ask(client)
    assert time.monotonic() - began < 3  # not 6 attempts with seconds of backoff
    message = str(caught.value)
    assert url in message and "Connection refused" in message
    assert caught.value.url == url and not caught.value.retryable


def test_a_wrong_model_name_is_refused_with_the_served_names(server):
    client = make_client(f"openai-compatible:qwen-7b@{server.openai_base_url}", settings())
    with pytest.raises(ModelNotServed) as caught:
        ask(client)
    assert "'qwen-7b'" in str(caught.value) and GGUF in str(caught.value)
    assert caught.value.available == [GGUF] and not caught.value.retryable
    assert server.requests == []  # nothing was generated for a model that is not there


def test_the_served_file_name_without_extension_is_accepted_and_checked_once(server):
    server.responder = lambda request: Reply(text="hi")
    name = GGUF.removesuffix(".gguf")
    client = make_client(f"openai-compatible:{name}@{server.openai_base_url}", settings())
    assert ask(client).text == "hi" and ask(client).text == "hi"
    assert server.model_list_requests == 1
    assert served_name_matches("llama3", ["llama3:latest"])
    assert not served_name_matches("llama3", ["mistral:latest"])


def test_a_server_without_a_model_list_is_not_checked():
    with ReplayServer(models=None) as server:
        server.responder = lambda request: Reply(text="fine")
        client = make_client(f"openai-compatible:any@{server.openai_base_url}", settings())
        assert ask(client).text == "fine"


def test_output_budget_follows_the_measured_speed(server):
    # 200 tokens in ~0.4 s: at most ~500 tokens/s, so a 1 s timeout fits at most ~400 tokens.
    server.enqueue(Slow(Reply(text="a", output_tokens=200), 0.4), Reply(text="b"))
    client = make_client(
        f"openai-compatible:{GGUF}@{server.openai_base_url}", settings(timeout_s=1.0)
    )
    ask(client)
    rate = RATES.tokens_per_s(client.spec.label)
    ask(client)
    first, second = (r.body["max_tokens"] for r in server.requests)
    assert first == 8192 and rate is not None and rate <= 500
    assert second == cap_output_tokens(8192, rate, 1.0) and second <= 400


def test_cap_output_tokens_arithmetic():
    assert cap_output_tokens(8192, None, 600) == 8192  # nothing measured yet
    assert cap_output_tokens(8192, 12.0, 600) == int(12 * 600 * 0.8)  # the CPU model
    assert cap_output_tokens(8192, 1000.0, 600) == 8192
    assert cap_output_tokens(8192, 0.01, 600) == 256  # a floor, not a useless 4 tokens


def test_a_timed_out_generation_is_retried_once_with_half_the_budget_then_fails(server):
    server.responder = lambda request: Slow(Reply(text="late"), 1.5)  # type: ignore[return-value]
    client = make_client(
        f"openai-compatible:{GGUF}@{server.openai_base_url}",
        settings(timeout_s=0.5, max_output_tokens=2048),
    )
    with pytest.raises(LLMTimeout) as caught:
        ask(client)
    budgets = [r.body["max_tokens"] for r in server.requests]
    assert budgets == [2048, 1024]  # never the same budget twice
    message = str(caught.value)
    assert "did not fit" in message and "GROUNDLOOP_LLM_TIMEOUT_S" in message
    assert not caught.value.retryable


def test_a_timeout_with_a_budget_too_small_to_halve_fails_at_once(server):
    server.responder = lambda request: Slow(Reply(text="late"), 1.5)  # type: ignore[return-value]
    client = make_client(
        f"openai-compatible:{GGUF}@{server.openai_base_url}",
        settings(timeout_s=0.5, max_output_tokens=300),
    )
    with pytest.raises(LLMTimeout):
        ask(client)
    assert len(server.requests) == 1


def _burst(client, calls: int) -> None:
    threads = [threading.Thread(target=ask, args=(client,)) for _ in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_one_call_at_a_time_on_a_local_endpoint_by_default(server):
    server.delay_s = 0.2
    server.responder = lambda request: Reply(text="ok")
    client = make_client(f"openai-compatible:{GGUF}@{server.openai_base_url}", settings())
    _burst(client, 3)
    assert len(server.requests) == 3 and server.max_in_flight == 1


def test_max_concurrency_allows_parallel_calls(server):
    server.delay_s = 0.5
    server.responder = lambda request: Reply(text="ok")
    client = make_client(
        f"openai-compatible:{GGUF}@{server.openai_base_url}", settings(max_concurrency=3)
    )
    _burst(client, 3)
    assert len(server.requests) == 3 and server.max_in_flight > 1


IDEAS = JsonSchema(
    "ideas",
    {
        "type": "object",
        "properties": {"ideas": {"type": "array", "items": {"type": "string"}}},
        "required": ["ideas"],
        "additionalProperties": False,
    },
)


def test_structured_output_is_sent_as_response_format(server):
    server.responder = lambda request: Reply(text='{"ideas": ["a"]}')
    client = make_client(f"openai-compatible:{GGUF}@{server.openai_base_url}", settings())
    assert ask(client, response_format=IDEAS).text == '{"ideas": ["a"]}'
    sent = server.requests[0].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"] == IDEAS.schema


def test_a_server_refusing_response_format_is_asked_again_in_plain_text(server):
    server.enqueue(Reply(status=400, error="response_format is not supported"))
    server.responder = lambda request: Reply(text="[Experiment] plain text")
    client = make_client(f"openai-compatible:{GGUF}@{server.openai_base_url}", settings())
    assert ask(client, response_format=IDEAS).text == "[Experiment] plain text"
    assert ask(client, response_format=IDEAS).text == "[Experiment] plain text"
    sent = ["response_format" in r.body for r in server.requests]
    assert sent == [True, False, False]  # refused once: not asked again by this client
