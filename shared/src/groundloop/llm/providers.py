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
from groundloop.llm import limits
from groundloop.llm.errors import LLMError as LLMError
from groundloop.llm.errors import LLMRequestRejected as LLMRequestRejected
from groundloop.llm.errors import MissingAPIKey as MissingAPIKey
from groundloop.llm.errors import ModelSpecError as ModelSpecError
from groundloop.llm.errors import describe as _describe
from groundloop.llm.errors import hint as _hint
from groundloop.llm.errors import retry_after as _retry_after
from groundloop.llm.errors import retryable_status as _retryable_status
from groundloop.llm.limits import RATES
from groundloop.llm.limits import LLMTimeout as LLMTimeout
from groundloop.llm.limits import LLMUnreachable as LLMUnreachable
from groundloop.llm.limits import ModelNotServed as ModelNotServed
from groundloop.llm.pricing import cost_usd
from groundloop.llm.structured import JsonSchema, tool_input_text

if TYPE_CHECKING:
    from groundloop.llm.client import LLMSettings, ModelSpec

# One component to operators: its logs keep the name they had before this module was split out.
log = logging.getLogger("groundloop.llm.client")


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
        response_format: JsonSchema | None = None,
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
        self._model_checked = False
        self._structured_ok = True  # until the server refuses response_format
        if price is None:
            log.info("no price for %s in the price table: its cost is counted as $0", spec.label)

    base_url: str | None = None  # where requests go (for messages and per-endpoint limits)

    def complete(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        max_tokens: int | None = None,
        thinking_budget: int | None = None,
        response_format: JsonSchema | None = None,
    ) -> Completion:
        """One answer; `thinking_budget` (Anthropic) overrides LLMSettings.thinking_budget;
        `response_format` asks for JSON matching a schema where the provider supports it.

        The output budget is capped to what the model's measured speed fits in the timeout. A
        timed-out generation is retried once with half the budget, never with the same one; a
        server that cannot be reached at all fails at once (LLMUnreachable)."""
        s = self.settings
        label = self.spec.label
        self._check_model_once()
        start = time.monotonic()
        deadline = start + s.max_total_s
        budget = limits.cap_output_tokens(
            max_tokens or s.max_output_tokens, RATES.tokens_per_s(label), s.timeout_s
        )
        slots = limits.concurrency_for(self.base_url, s.max_concurrency)
        timeouts, last, attempt = 0, None, 0
        for attempt in range(1, s.max_attempts + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            structured = response_format if self._structured_ok else None
            try:
                with limits.endpoint_slot(self.base_url, slots):
                    began = time.monotonic()  # waiting for a slot is not generation time
                    raw = self._call(
                        list(messages),
                        system,
                        budget,
                        timeout=min(s.timeout_s, remaining),
                        thinking_budget=thinking_budget or s.thinking_budget,
                        response_format=structured,
                    )
            except Exception as exc:  # classified below; unknown errors are not retried
                status = getattr(exc, "status_code", None)
                os_error = limits.unreachable_os_error(exc) if self._retryable(exc) else None
                if os_error is not None:
                    raise limits.unreachable(label, self.base_url or "?", os_error) from None
                if self._is_timeout(exc):
                    timeouts += 1
                    budget = limits.budget_after_timeout(
                        label, budget, timeouts, min(s.timeout_s, remaining)
                    )
                    last = exc
                    continue
                if structured is not None and status in (400, 422):
                    log.warning(
                        "%s: the server refused structured output (%s); asking in plain text",
                        label,
                        _describe(exc),
                    )
                    self._structured_ok = False
                    continue
                if not self._retryable(exc):
                    raise LLMRequestRejected(
                        f"{label}: request refused ({_describe(exc)}); " + _hint(self.spec, status)
                    ) from None
                last = exc
                delay = self._delay(attempt, exc)
                if attempt == s.max_attempts or time.monotonic() + delay > deadline:
                    break
                log.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.1fs",
                    label,
                    attempt,
                    s.max_attempts,
                    _describe(exc),
                    delay,
                )
                self._sleep(delay)
                continue
            RATES.record(label, raw.output_tokens, time.monotonic() - began)
            usage = Usage(
                calls=1,
                input_tokens=raw.input_tokens,
                output_tokens=raw.output_tokens,
                cost_usd=cost_usd(self.price, raw.input_tokens, raw.output_tokens),
            )
            log.debug(
                "%s: %d in / %d out tokens, $%.4f",
                label,
                usage.input_tokens,
                usage.output_tokens,
                usage.cost_usd,
            )
            return Completion(text=raw.text, usage=usage, model=label, stop_reason=raw.stop_reason)
        raise LLMError(
            f"{label}: gave up after {attempt} attempt(s) in {time.monotonic() - start:.0f}s "
            f"(limit {s.max_attempts} attempts / {s.max_total_s:.0f}s); last error: "
            f"{_describe(last) if last else 'none'}; check the provider's status or raise "
            "GROUNDLOOP_LLM_MAX_TOTAL_S"
        )

    def _check_model_once(self) -> None:
        """Compare the model name with the server's list, once per client, where it has one."""
        if self._model_checked:
            return
        with self._lock:
            if self._model_checked:
                return
            served = self._served_models() if self.settings.check_model_name else None
            self._model_checked = True
        if served:
            limits.check_model_name(self.spec.label, self.spec.model, self.base_url or "?", served)

    def _served_models(self) -> list[str] | None:
        return None  # providers whose model list is worth checking override this

    def _is_timeout(self, exc: BaseException) -> bool:
        raise NotImplementedError

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
        response_format: JsonSchema | None = None,
    ) -> _Raw:
        raise NotImplementedError

    def _retryable(self, exc: BaseException) -> bool:
        raise NotImplementedError


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
        self.base_url = base_url or "https://api.openai.com/v1"
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
        response_format: JsonSchema | None = None,
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
        if response_format is not None:
            kwargs["response_format"] = response_format.openai_response_format()
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

    def _served_models(self) -> list[str] | None:
        if self.spec.provider != "openai-compatible":
            return None  # OpenAI's list is long and a key may not be allowed to read it
        try:
            page = self._client.models.list(timeout=min(10.0, self.settings.timeout_s))
        except self._errors.APIConnectionError as exc:
            os_error = limits.unreachable_os_error(exc)
            if os_error is not None:
                raise limits.unreachable(self.spec.label, self.base_url or "?", os_error) from None
            return None
        except Exception as exc:  # no list (404, an old server): the first call will tell
            log.debug("%s: no model list (%s)", self.spec.label, _describe(exc))
            return None
        return [m.id for m in getattr(page, "data", []) if getattr(m, "id", None)]

    def _is_timeout(self, exc: BaseException) -> bool:
        return isinstance(exc, self._errors.APITimeoutError)

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
        self.base_url = spec.base_url or settings.anthropic_base_url or "https://api.anthropic.com"
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
        response_format: JsonSchema | None = None,
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
            if response_format is not None:  # a forced tool call cannot follow thinking
                kwargs["tools"] = [response_format.anthropic_tool()]
                kwargs["tool_choice"] = {"type": "tool", "name": response_format.name}
        response = self._client.messages.create(**kwargs)
        text = "".join(
            block.text for block in response.content if getattr(block, "type", "") == "text"
        )
        if response_format is not None and not budget:
            text = tool_input_text(response.content, response_format.name) or text
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

    def _is_timeout(self, exc: BaseException) -> bool:
        return isinstance(exc, self._errors.APITimeoutError)

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
