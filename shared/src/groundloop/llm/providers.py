"""The model clients: the `LLMClient` contract, what a call returns or raises, and the two
implementations (`OpenAIClient` for OpenAI and OpenAI-compatible servers, `AnthropicClient`).

Calls retry on rate limits, 5xx and connection errors with exponential backoff and jitter
inside a bounded total time (`LLMSettings.max_total_s`); every request has its own timeout;
keys are never logged. Each answer's cost comes from the price given at construction.

Split from `groundloop.llm.client` (model specs, settings, price table, `make_client`,
`ClientCache`), which re-exports everything here; build clients through `make_client`. This
module needs `ModelSpec` and `LLMSettings` only as annotations, so it never imports
`groundloop.llm.client` at run time and the two form no import cycle. The error classes live here
because the clients raise them; `groundloop.llm.client` raises them too. Logs go to the
"groundloop.llm.client" logger, as they did before the split.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from groundloop.events import ModelPrice, Usage
from groundloop.llm.pricing import cost_usd

if TYPE_CHECKING:
    from groundloop.llm.client import LLMSettings, ModelSpec

# One component to operators: its logs keep the name they had before this module was split out.
log = logging.getLogger("groundloop.llm.client")


class LLMError(RuntimeError):
    """A model call that failed for good (after retries); the message says why and what to do."""

    retryable = True  # worth trying the whole job again later (e.g. the provider was down)


class ModelSpecError(LLMError, ValueError):
    retryable = False


class MissingAPIKey(LLMError):
    retryable = False


class LLMRequestRejected(LLMError):
    """The provider refused the request itself (bad key, unknown model, invalid request)."""

    retryable = False


@dataclass(frozen=True)
class Completion:
    text: str
    usage: Usage
    model: str  # spec label
    stop_reason: str | None = None


Message = dict[str, str]  # {"role": "user" | "assistant", "content": "..."}


class LLMClient(Protocol):
    """What the ideator and implementer need from a model; tests pass real clients aimed at a
    local server speaking the provider's wire format."""

    spec: ModelSpec

    def complete(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        max_tokens: int | None = None,
        thinking_budget: int | None = None,
    ) -> Completion: ...


# --------------------------------------------------------------------------------- retries


@dataclass
class _Raw:
    text: str
    input_tokens: int
    output_tokens: int
    stop_reason: str | None


class _RetryingClient:
    """Shared retry/backoff/cost logic; subclasses implement `_call` and `_retryable`."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: LLMSettings,
        price: ModelPrice | None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.spec, self.settings, self.price, self._sleep = spec, settings, price, sleep
        self._rng = random.Random()
        self._lock = threading.Lock()
        if price is None:
            log.info("no price for %s in the price table: its cost is counted as $0", spec.label)

    def complete(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        max_tokens: int | None = None,
        thinking_budget: int | None = None,
    ) -> Completion:
        """One answer; `thinking_budget` (Anthropic) overrides LLMSettings.thinking_budget."""
        s = self.settings
        start = time.monotonic()
        deadline = start + s.max_total_s
        last: BaseException | None = None
        for attempt in range(1, s.max_attempts + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                raw = self._call(
                    list(messages),
                    system,
                    max_tokens or s.max_output_tokens,
                    timeout=min(s.timeout_s, remaining),
                    thinking_budget=thinking_budget or s.thinking_budget,
                )
            except Exception as exc:  # classified below; unknown errors are not retried
                status = getattr(exc, "status_code", None)
                if not self._retryable(exc):
                    raise LLMRequestRejected(
                        f"{self.spec.label}: request refused ({_describe(exc)}); "
                        + _hint(self.spec, status)
                    ) from None
                last = exc
                delay = self._delay(attempt, exc)
                if attempt == s.max_attempts or time.monotonic() + delay > deadline:
                    break
                log.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.1fs",
                    self.spec.label,
                    attempt,
                    s.max_attempts,
                    _describe(exc),
                    delay,
                )
                self._sleep(delay)
                continue
            usage = Usage(
                calls=1,
                input_tokens=raw.input_tokens,
                output_tokens=raw.output_tokens,
                cost_usd=cost_usd(self.price, raw.input_tokens, raw.output_tokens),
            )
            log.debug(
                "%s: %d in / %d out tokens, $%.4f",
                self.spec.label,
                usage.input_tokens,
                usage.output_tokens,
                usage.cost_usd,
            )
            return Completion(
                text=raw.text, usage=usage, model=self.spec.label, stop_reason=raw.stop_reason
            )
        raise LLMError(
            f"{self.spec.label}: gave up after {attempt} attempt(s) in {time.monotonic() - start:.0f}s "
            f"(limit {s.max_attempts} attempts / {s.max_total_s:.0f}s); last error: "
            f"{_describe(last) if last else 'none'}; check the provider's status or raise "
            "GROUNDLOOP_LLM_MAX_TOTAL_S"
        )

    def _delay(self, attempt: int, exc: BaseException) -> float:
        s = self.settings
        backoff = min(s.backoff_initial_s * 2 ** (attempt - 1), s.backoff_max_s)
        with self._lock:
            jittered = backoff * (0.5 + 0.5 * self._rng.random())
        after = _retry_after(exc)
        return min(max(jittered, after or 0.0), s.backoff_max_s)

    def _call(
        self,
        messages: list[Message],
        system: str | None,
        max_tokens: int,
        *,
        timeout: float,
        thinking_budget: int | None,
    ) -> _Raw:
        raise NotImplementedError

    def _retryable(self, exc: BaseException) -> bool:
        raise NotImplementedError


def _retryable_status(status: int | None) -> bool:
    return status in (408, 409, 425, 429) or (status is not None and status >= 500)


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        return float(headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {text}"


def _hint(spec: ModelSpec, status: int | None) -> str:
    if status in (401, 403):
        var = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}.get(
            spec.provider, "GROUNDLOOP_LLM_COMPATIBLE_API_KEY"
        )
        return f"the key was rejected: check {var}"
    if status == 404:
        return f"check the model name {spec.model!r} and the base URL"
    return "check the model name and settings"


# ------------------------------------------------------------------------------- providers


class OpenAIClient(_RetryingClient):
    """OpenAI and any OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp)."""

    def __init__(self, spec: ModelSpec, settings: LLMSettings, price: ModelPrice | None, **kw: Any):
        super().__init__(spec, settings, price, **kw)
        openai = _import("openai")
        if spec.provider == "openai":
            key, base_url = settings.openai_api_key, spec.base_url or settings.openai_base_url
            if key is None:
                raise MissingAPIKey(
                    f"{spec.label} needs an OpenAI key: export OPENAI_API_KEY=... "
                    "(or GROUNDLOOP_OPENAI_API_KEY), or pick another model"
                )
            api_key = key.get_secret_value()
        else:
            base_url = spec.base_url or settings.compatible_base_url
            if not base_url:
                raise ModelSpecError(
                    f"{spec.label} has no server URL: write openai-compatible:{spec.model}@http://host:port/v1 "
                    "or set GROUNDLOOP_LLM_COMPATIBLE_BASE_URL"
                )
            key = settings.compatible_api_key
            api_key = key.get_secret_value() if key else "no-key"  # local servers ignore it
        self._errors = openai
        # Retries are ours (bounded total time, logged), so the SDK's are off.
        self._client = openai.OpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=settings.timeout_s
        )

    def _call(
        self,
        messages: list[Message],
        system: str | None,
        max_tokens: int,
        *,
        timeout: float,
        thinking_budget: int | None,
    ) -> _Raw:
        chat = ([{"role": "system", "content": system}] if system else []) + messages
        kwargs: dict[str, Any] = {"model": self.spec.model, "messages": chat, "timeout": timeout}
        if self.spec.provider == "openai":
            kwargs["max_completion_tokens"] = max_tokens  # gpt-5 / o-series refuse max_tokens
            if self.settings.openai_reasoning_effort:
                kwargs["reasoning_effort"] = self.settings.openai_reasoning_effort
        else:
            kwargs["max_tokens"] = max_tokens  # what vLLM / llama.cpp / Ollama understand
        if self.settings.temperature is not None:
            kwargs["temperature"] = self.settings.temperature
        response = self._client.chat.completions.create(**kwargs)
        if not response.choices:
            raise LLMRequestRejected(f"{self.spec.label}: the response has no choices")
        choice = response.choices[0]
        usage = response.usage
        return _Raw(
            text=choice.message.content or "",
            input_tokens=(usage.prompt_tokens or 0) if usage else 0,
            output_tokens=(usage.completion_tokens or 0) if usage else 0,
            stop_reason=choice.finish_reason,
        )

    def _retryable(self, exc: BaseException) -> bool:
        e = self._errors
        if isinstance(exc, e.APIConnectionError):  # includes timeouts
            return True
        if isinstance(exc, e.APIStatusError):
            return _retryable_status(exc.status_code)
        return False


class AnthropicClient(_RetryingClient):
    """Anthropic Messages API, with the extended-thinking budget as an option."""

    def __init__(self, spec: ModelSpec, settings: LLMSettings, price: ModelPrice | None, **kw: Any):
        super().__init__(spec, settings, price, **kw)
        anthropic = _import("anthropic")
        if settings.anthropic_api_key is None:
            raise MissingAPIKey(
                f"{spec.label} needs an Anthropic key: export ANTHROPIC_API_KEY=... "
                "(or GROUNDLOOP_ANTHROPIC_API_KEY), or pick another model"
            )
        self._errors = anthropic
        self._client = anthropic.Anthropic(
            api_key=settings.anthropic_api_key.get_secret_value(),
            base_url=spec.base_url or settings.anthropic_base_url,
            max_retries=0,
            timeout=settings.timeout_s,
        )

    def _call(
        self,
        messages: list[Message],
        system: str | None,
        max_tokens: int,
        *,
        timeout: float,
        thinking_budget: int | None,
    ) -> _Raw:
        kwargs: dict[str, Any] = {
            "model": self.spec.model,
            "messages": messages,
            "timeout": timeout,
        }
        if system:
            kwargs["system"] = system
        budget = thinking_budget
        if budget:
            # max_tokens covers thinking + answer; temperature must stay at its default.
            kwargs["thinking"] = {"type": "enabled", "budget_tokens": budget}
            kwargs["max_tokens"] = budget + max_tokens
        else:
            kwargs["max_tokens"] = max_tokens
            if self.settings.temperature is not None:
                kwargs["temperature"] = self.settings.temperature
        response = self._client.messages.create(**kwargs)
        text = "".join(
            block.text for block in response.content if getattr(block, "type", "") == "text"
        )
        u = response.usage
        input_tokens = (
            (u.input_tokens or 0)
            + (getattr(u, "cache_creation_input_tokens", 0) or 0)
            + (getattr(u, "cache_read_input_tokens", 0) or 0)
        )
        return _Raw(
            text=text,
            input_tokens=input_tokens,
            output_tokens=u.output_tokens or 0,
            stop_reason=response.stop_reason,
        )

    def _retryable(self, exc: BaseException) -> bool:
        e = self._errors
        if isinstance(exc, e.APIConnectionError):
            return True
        if isinstance(exc, e.APIStatusError):
            return _retryable_status(exc.status_code)  # 529 "overloaded" is >= 500
        return False


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        raise LLMError(f"the `{name}` package is missing: pip install 'groundloop[llm]'") from None
