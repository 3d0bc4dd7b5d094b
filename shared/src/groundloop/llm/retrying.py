"""The `LLMClient` contract, what a call returns, and the retry/backoff/cost logic every
provider client shares (`_RetryingClient`; the providers themselves are in
`groundloop.llm.providers`, which re-exports everything here).

Calls retry on rate limits, 5xx and connection errors with exponential backoff and jitter
inside a bounded total time (`LLMSettings.max_total_s`); every request has its own timeout;
keys are never logged. Each answer's cost comes from the price given at construction. Needs
`ModelSpec` and `LLMSettings` only as annotations (no import cycle with
`groundloop.llm.client`). Logs go to the "groundloop.llm.client" logger.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from groundloop.events import ModelPrice, Usage
from groundloop.llm import limits
from groundloop.llm.errors import LLMError, LLMRequestRejected
from groundloop.llm.errors import describe as _describe
from groundloop.llm.errors import hint as _hint
from groundloop.llm.errors import retry_after as _retry_after
from groundloop.llm.limits import RATES
from groundloop.llm.pricing import cost_usd
from groundloop.llm.structured import JsonSchema

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
