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
from groundloop.llm.pricing import DEFAULT_PRICES, PriceUnknown, load_price_table, require_price
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
        description="OpenAI key (also read from OPENAI_API_KEY)",
    )
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "anthropic_api_key", "GROUNDLOOP_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"
        ),
        description="Anthropic key (also read from ANTHROPIC_API_KEY)",
    )
    compatible_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("compatible_api_key", "GROUNDLOOP_LLM_COMPATIBLE_API_KEY"),
        description="key for an OpenAI-compatible server, if it needs one (vLLM --api-key)",
    )
    openai_base_url: str | None = Field(
        default=None, description="a proxy or test server for OpenAI"
    )
    anthropic_base_url: str | None = Field(
        default=None, description="a proxy or test server for Anthropic"
    )
    compatible_base_url: str | None = Field(
        default=None, description="base URL for `openai-compatible:model` without @url"
    )
    timeout_s: float = Field(
        default=600.0, description="one request; long reasoning answers take minutes"
    )
    max_attempts: int = Field(
        default=6,
        ge=1,
        description="attempts per call for retryable errors (timeouts are not blindly retried)",
    )
    max_total_s: float = Field(
        default=1800.0, description="all attempts of one call, sleeps included"
    )
    backoff_initial_s: float = Field(default=2.0, description="first retry delay")
    backoff_max_s: float = Field(default=60.0, description="longest retry delay")
    max_output_tokens: int = Field(
        default=8192,
        description="output cap per call, lowered to what the model's measured tokens/s fits in timeout_s",
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="concurrent calls per endpoint in one process; unset: 1 for a server on this machine, unlimited otherwise",
    )
    check_model_name: bool = Field(
        default=True, description="compare the model name with the server's /v1/models list"
    )
    temperature: float | None = Field(
        default=None, description="unset: the provider's default (reasoning models need it)"
    )
    thinking_budget: int | None = Field(
        default=None, description="Anthropic extended thinking, in tokens"
    )
    openai_reasoning_effort: str | None = Field(
        default=None, description="low, medium or high for gpt-5 and the o-series"
    )
    prices: dict[str, ModelPrice] = Field(
        default={},
        description='price entries over the table, JSON: {"provider:model": '
        '{"input_per_mtok": 3.0, "output_per_mtok": 15.0}} (dollars per million tokens)',
    )
    prices_file: Path | None = Field(
        default=None,
        description="a TOML (shaped like groundloop/llm/prices.toml) or JSON price file whose "
        "entries override the built-in table",
    )


class ModelPriceUnknown(LLMError, ValueError):
    """A hosted model with no price in the table in force (see pricing.require_price)."""


def endpoint_url(spec: ModelSpec, settings: LLMSettings) -> str | None:
    """The base URL calls for `spec` go to: its own, else the provider's setting."""
    if spec.base_url:
        return spec.base_url
    return {
        "openai": settings.openai_base_url,
        "anthropic": settings.anthropic_base_url,
        "openai-compatible": settings.compatible_base_url,
    }[spec.provider]


def model_price(
    spec: ModelSpec, settings: LLMSettings, table: dict[str, ModelPrice]
) -> ModelPrice | None:
    """The model's price, $0 on a server on this machine; ModelPriceUnknown otherwise. None
    for a compatible server with no URL at all: the client's error says how to give one."""
    if spec.provider == "openai-compatible" and endpoint_url(spec, settings) is None:
        return None
    try:
        return require_price(table, spec, endpoint_url(spec, settings))
    except PriceUnknown as exc:
        raise ModelPriceUnknown(str(exc)) from None


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
    price = model_price(spec, settings, table)
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
