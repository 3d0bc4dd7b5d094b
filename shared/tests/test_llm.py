"""groundloop.llm.client against a local server speaking the OpenAI / Anthropic wire formats."""

from __future__ import annotations

import logging

import pytest

from groundloop.events import ModelPrice, Usage
from groundloop.llm.client import (
    DEFAULT_PRICES,
    LLMError,
    LLMRequestRejected,
    LLMSettings,
    MissingAPIKey,
    ModelSpec,
    ModelSpecError,
    make_client,
    price_table,
)
from groundloop.llm.pricing import add_usage
from tests.llm_server import FakeLLMServer, Reply
from tests.llm_server import fast_settings as llm_fast_settings

SECRET = "sk-test-secret-0123456789"


@pytest.fixture
def server():
    with FakeLLMServer() as s:
        yield s


def fast_settings(server: FakeLLMServer, **overrides) -> LLMSettings:
    return llm_fast_settings(server, SECRET, **overrides)


def test_model_spec_parsing():
    assert ModelSpec.parse("anthropic:claude-sonnet-4-5") == ModelSpec(
        "anthropic", "claude-sonnet-4-5"
    )
    assert ModelSpec.parse("openai:gpt-5").label == "openai:gpt-5"
    spec = ModelSpec.parse("openai-compatible:qwen2.5-coder:7b@http://user:pw@host:8000/v1")
    assert (spec.provider, spec.model, spec.base_url) == (
        "openai-compatible",
        "qwen2.5-coder:7b",
        "http://user:pw@host:8000/v1",
    )
    assert spec.label == "openai-compatible:qwen2.5-coder:7b@http://host:8000/v1"  # no credentials
    for bad in ("gpt-5", "mistral:large", "openai:", ""):
        with pytest.raises(ModelSpecError, match="provider:model"):
            ModelSpec.parse(bad)


def test_openai_call_returns_text_usage_and_cost(server):
    server.enqueue(Reply(text="hello", input_tokens=1_000_000, output_tokens=100_000))
    client = make_client("openai:gpt-5", fast_settings(server))
    done = client.complete([{"role": "user", "content": "hi"}], system="be brief")
    assert done.text == "hello"
    price = DEFAULT_PRICES["openai:gpt-5"]
    assert (done.usage.calls, done.usage.input_tokens, done.usage.output_tokens) == (
        1,
        1_000_000,
        100_000,
    )
    assert done.usage.cost_usd == pytest.approx(price.input_per_mtok + price.output_per_mtok / 10)
    [request] = server.requests
    assert request.body["model"] == "gpt-5"
    assert request.body["messages"][0] == {"role": "system", "content": "be brief"}
    assert request.body["max_completion_tokens"] == 8192
    assert request.headers["authorization"] == f"Bearer {SECRET}"


def test_anthropic_thinking_budget_and_text_blocks(server):
    server.enqueue(
        Reply(text="answer", thinking="let me think", input_tokens=200, output_tokens=300)
    )
    settings = fast_settings(server, thinking_budget=4000, max_output_tokens=1000)
    client = make_client("anthropic:claude-sonnet-4-5", settings)
    done = client.complete([{"role": "user", "content": "q"}], system="sys")
    assert done.text == "answer"  # thinking blocks are not part of the answer
    assert done.usage.cost_usd == pytest.approx((200 * 3 + 300 * 15) / 1e6)
    body = server.requests[0].body
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 4000}
    assert body["max_tokens"] == 5000 and body["system"] == "sys" and "temperature" not in body
    headers = server.requests[0].headers  # the key travels as x-api-key or a bearer token
    assert SECRET in (
        headers.get("x-api-key"),
        headers.get("authorization", "").removeprefix("Bearer "),
    )


def test_compatible_server_by_url_without_key_and_custom_prices(server):
    server.enqueue(Reply(text="ok", input_tokens=10, output_tokens=20))
    settings = fast_settings(
        server, prices={"qwen": ModelPrice(input_per_mtok=1e6, output_per_mtok=0)}
    )
    client = make_client(f"openai-compatible:qwen@{server.openai_base_url}", settings)
    done = client.complete([{"role": "user", "content": "x"}], max_tokens=77)
    assert done.usage.cost_usd == pytest.approx(10.0)  # looked up by bare model name
    assert server.requests[0].body["max_tokens"] == 77
    assert done.model == f"openai-compatible:qwen@{server.openai_base_url}"


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_retries_on_500_and_429_then_success(server, provider, caplog):
    server.enqueue(
        Reply(status=500),
        Reply(status=429, headers={"retry-after": "0.01"}),
        Reply(text="finally", input_tokens=5, output_tokens=6),
    )
    client = make_client(f"{provider}:m", fast_settings(server))
    with caplog.at_level(logging.DEBUG):
        done = client.complete([{"role": "user", "content": "x"}])
    assert done.text == "finally" and done.usage.calls == 1
    assert len(server.requests) == 3
    assert SECRET not in caplog.text  # keys never reach logs


def test_gives_up_within_bounded_attempts(server):
    server.responder = lambda request: Reply(status=503)
    client = make_client("openai:gpt-5", fast_settings(server, max_attempts=3))
    with pytest.raises(LLMError, match="gave up after 3 attempt") as info:
        client.complete([{"role": "user", "content": "x"}])
    assert info.value.retryable and SECRET not in str(info.value)
    assert len(server.requests) == 3


def test_gives_up_when_total_time_is_spent(server):
    server.responder = lambda request: Reply(status=503)
    settings = fast_settings(
        server, max_attempts=100, backoff_initial_s=0.2, backoff_max_s=0.2, max_total_s=0.5
    )
    with pytest.raises(LLMError, match="gave up"):
        make_client("openai:gpt-5", settings).complete([{"role": "user", "content": "x"}])
    assert len(server.requests) < 6


def test_rejected_key_is_not_retried_and_says_which_variable(server):
    server.enqueue(Reply(status=401, error="invalid x-api-key"))
    client = make_client("anthropic:claude-sonnet-4-5", fast_settings(server))
    with pytest.raises(LLMRequestRejected, match="ANTHROPIC_API_KEY") as info:
        client.complete([{"role": "user", "content": "x"}])
    assert not info.value.retryable and len(server.requests) == 1


def test_missing_keys_fail_early_with_the_fix(monkeypatch):
    for var in (
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "GROUNDLOOP_OPENAI_API_KEY",
        "GROUNDLOOP_ANTHROPIC_API_KEY",
    ):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MissingAPIKey, match="export OPENAI_API_KEY"):
        make_client("openai:gpt-5", LLMSettings())
    with pytest.raises(MissingAPIKey, match="export ANTHROPIC_API_KEY"):
        make_client("anthropic:claude-sonnet-4-5", LLMSettings())
    with pytest.raises(ModelSpecError, match="GROUNDLOOP_LLM_COMPATIBLE_BASE_URL"):
        make_client("openai-compatible:qwen", LLMSettings())


def test_keys_and_prices_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.setenv(
        "GROUNDLOOP_LLM_PRICES", '{"openai:gpt-5": {"input_per_mtok": 9, "output_per_mtok": 9}}'
    )
    prices_file = tmp_path / "prices.json"
    prices_file.write_text('{"local:m": {"input_per_mtok": 1, "output_per_mtok": 2}}')
    monkeypatch.setenv("GROUNDLOOP_LLM_PRICES_FILE", str(prices_file))
    settings = LLMSettings()
    assert settings.anthropic_api_key.get_secret_value() == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    table = price_table(settings)
    assert table["openai:gpt-5"].input_per_mtok == 9 and table["local:m"].output_per_mtok == 2
    assert table["anthropic:claude-sonnet-4-5"] == DEFAULT_PRICES["anthropic:claude-sonnet-4-5"]


def test_add_usage():
    total = add_usage(
        Usage(calls=1, input_tokens=2, output_tokens=3, cost_usd=0.5),
        Usage(calls=2, input_tokens=1, output_tokens=1, cost_usd=0.25),
    )
    assert total == Usage(calls=3, input_tokens=3, output_tokens=4, cost_usd=0.75)
