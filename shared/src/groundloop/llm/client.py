"""Language-model clients: one setting names the model, every call returns text + Usage.

Model specs (ProposerSettings.model / ImplementerSettings.model):

    anthropic:claude-sonnet-4-5                              official `anthropic` client
    openai:gpt-5                                             official `openai` client
    openai-compatible:qwen2.5-coder@http://host:8000/v1      vLLM, Ollama, llama.cpp server, ...
    openai-compatible:qwen2.5-coder                          base URL from GROUNDLOOP_LLM_COMPATIBLE_BASE_URL

Keys come from the environment (OPENAI_API_KEY, ANTHROPIC_API_KEY, or GROUNDLOOP_-prefixed
variants) or from `LLMSettings`; they are held as SecretStr, never logged and never put in
events. Calls retry on rate limits, 5xx and dropped connections with exponential backoff and
jitter inside a bounded total time (`max_total_s`); every request has its own timeout. What
cannot succeed fails at once: a server that refuses connections (LLMUnreachable, naming the
URL and the OS error), a model name the server does not list (ModelNotServed), an answer that
does not fit the timeout even with half the output budget (LLMTimeout). Output budgets follow
the model's measured speed and calls per endpoint are limited (`groundloop.llm.limits`);
`complete(response_format=JsonSchema(...))` asks for structured output (`groundloop.llm.structured`).
Cost per call comes from a price table (dollars per million tokens); the table in force is
recorded in SearchStarted.price_table so a search's dollars are reproducible.

The `openai` and `anthropic` packages are the `llm` extra, imported only when a client is made.

The client classes, the `LLMClient` contract, `Completion` and the `LLMError` family live in
`groundloop.llm.providers` and are re-exported here, where callers have always imported them.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from groundloop.events import ModelPrice
from groundloop.events import Usage as Usage
from groundloop.llm.pricing import DEFAULT_PRICES, load_price_table, price_for
from groundloop.llm.pricing import cost_usd as cost_usd
from groundloop.llm.providers import (
    AnthropicClient,
    LLMClient,
    LLMError,
    ModelSpecError,
    OpenAIClient,
)
from groundloop.llm.providers import Completion as Completion
from groundloop.llm.providers import LLMRequestRejected as LLMRequestRejected
from groundloop.llm.providers import LLMTimeout as LLMTimeout
from groundloop.llm.providers import LLMUnreachable as LLMUnreachable
from groundloop.llm.providers import Message as Message
from groundloop.llm.providers import MissingAPIKey as MissingAPIKey
from groundloop.llm.providers import ModelNotServed as ModelNotServed
from groundloop.llm.structured import JsonSchema as JsonSchema

log = logging.getLogger(__name__)

Provider = Literal["openai", "anthropic", "openai-compatible"]
PROVIDERS: tuple[str, ...] = ("openai", "anthropic", "openai-compatible")


class LLMSettings(BaseSettings):
    """Everything about reaching models. Built in main() (reads the environment) or by tests."""

    model_config = SettingsConfigDict(
        env_prefix="GROUNDLOOP_LLM_", extra="ignore", populate_by_name=True
    )

    openai_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "openai_api_key", "GROUNDLOOP_OPENAI_API_KEY", "OPENAI_API_KEY"
        ),
    )
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "anthropic_api_key", "GROUNDLOOP_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"
        ),
    )
    # Local servers usually need no key; some (vLLM --api-key) do.
    compatible_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("compatible_api_key", "GROUNDLOOP_LLM_COMPATIBLE_API_KEY"),
    )
    openai_base_url: str | None = None  # a proxy, or a test server
    anthropic_base_url: str | None = None
    compatible_base_url: str | None = None  # for `openai-compatible:model` without @url
    timeout_s: float = 600.0  # one request; long reasoning answers take minutes
    max_attempts: int = Field(default=6, ge=1)
    max_total_s: float = 1800.0  # all attempts of one call, sleeps included
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 60.0
    # Capped further per call to what the model's measured speed fits in timeout_s.
    max_output_tokens: int = 8192
    # Concurrent calls per endpoint (base URL) in one process; None: 1 for a server on this
    # machine (a CPU-served model runs one generation at a time), unlimited otherwise.
    max_concurrency: int | None = Field(default=None, ge=1)
    # Compare the model name with the server's /v1/models list (openai-compatible servers).
    check_model_name: bool = True
    temperature: float | None = None  # None: the provider's default (reasoning models need it)
    thinking_budget: int | None = None  # Anthropic extended thinking, in tokens
    # "low" | "medium" | "high" for gpt-5 and the o-series
    openai_reasoning_effort: str | None = None
    prices: dict[str, ModelPrice] = {}  # JSON in GROUNDLOOP_LLM_PRICES
    # JSON {"provider:model": {"input_per_mtok": .., "output_per_mtok": ..}}
    prices_file: Path | None = None


# ---------------------------------------------------------------------------- model specs


@dataclass(frozen=True)
class ModelSpec:
    provider: Provider
    model: str
    base_url: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        provider, sep, rest = text.strip().partition(":")
        if not sep or provider not in PROVIDERS or not rest:
            raise ModelSpecError(
                f"model {text!r} is not `provider:model`; providers: {', '.join(PROVIDERS)} "
                "(e.g. anthropic:claude-sonnet-4-5, openai:gpt-5, "
                "openai-compatible:qwen2.5-coder@http://localhost:8000/v1)"
            )
        model, base_url = rest, None
        at = rest.rfind("@http")
        if at > 0:
            model, base_url = rest[:at], rest[at + 1 :]
        if base_url is not None and provider != "openai-compatible":
            # Allowed (a proxy), but most likely a typo; say so once.
            log.info(
                "model %s: using base URL %s for provider %s", model, _safe_url(base_url), provider
            )
        return cls(provider=provider, model=model, base_url=base_url)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        """The name recorded in events: provider:model[@url], credentials stripped from the URL."""
        name = f"{self.provider}:{self.model}"
        return f"{name}@{_safe_url(self.base_url)}" if self.base_url else name


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def price_table(settings: LLMSettings | None = None) -> dict[str, ModelPrice]:
    """The table in force: defaults, then the prices file, then GROUNDLOOP_LLM_PRICES."""
    if settings is None:
        return dict(DEFAULT_PRICES)
    try:
        return load_price_table(settings.prices_file, settings.prices)
    except ValueError as exc:
        raise LLMError(str(exc)) from None


# ---------------------------------------------------------------------------- clients


def make_client(
    model: str | ModelSpec,
    settings: LLMSettings | None = None,
    prices: dict[str, ModelPrice] | None = None,
    **kw: Any,
) -> LLMClient:
    """A client for `model` ("provider:model[@url]"); raises MissingAPIKey / ModelSpecError early."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec.parse(model)
    settings = settings if settings is not None else LLMSettings()
    table = prices if prices else price_table(settings)
    price = price_for(table, spec)
    if spec.provider == "anthropic":
        return AnthropicClient(spec, settings, price, **kw)
    return OpenAIClient(spec, settings, price, **kw)


class ClientCache:
    """One client per (model, price table) for a service's lifetime (clients are thread-safe)."""

    def __init__(self, settings: LLMSettings | None = None):
        self.settings = settings if settings is not None else LLMSettings()
        self._clients: dict[tuple[str, str], LLMClient] = {}
        self._lock = threading.Lock()

    def __call__(self, model: str, prices: dict[str, ModelPrice] | None = None) -> LLMClient:
        table = prices or price_table(self.settings)
        key = (model, json.dumps({k: v.model_dump() for k, v in sorted(table.items())}))
        with self._lock:
            if key not in self._clients:
                self._clients[key] = make_client(model, self.settings, table)
            return self._clients[key]
