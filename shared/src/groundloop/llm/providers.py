"""The model clients: `OpenAIClient` for OpenAI and OpenAI-compatible servers, and
`AnthropicClient`, on the shared retry logic of `groundloop.llm.retrying` (the `LLMClient`
contract, `Completion`, `Message`), which is re-exported here with the error classes.

Split from `groundloop.llm.client` (model specs, settings, price table, `make_client`,
`ClientCache`), which re-exports everything here; build clients through `make_client`. This
module needs `ModelSpec` and `LLMSettings` only as annotations, so it never imports
`groundloop.llm.client` at run time and the two form no import cycle. The error classes live
beside the clients that raise them; `groundloop.llm.client` raises them too. Logs go to the
"groundloop.llm.client" logger, as they did before the split.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from groundloop.events import ModelPrice
from groundloop.llm import limits
from groundloop.llm.errors import LLMError as LLMError
from groundloop.llm.errors import LLMRequestRejected as LLMRequestRejected
from groundloop.llm.errors import MissingAPIKey as MissingAPIKey
from groundloop.llm.errors import ModelSpecError as ModelSpecError
from groundloop.llm.errors import describe as _describe
from groundloop.llm.errors import retryable_status as _retryable_status
from groundloop.llm.limits import LLMTimeout as LLMTimeout
from groundloop.llm.limits import LLMUnreachable as LLMUnreachable
from groundloop.llm.limits import ModelNotServed as ModelNotServed
from groundloop.llm.retrying import Completion as Completion
from groundloop.llm.retrying import LLMClient as LLMClient
from groundloop.llm.retrying import Message as Message
from groundloop.llm.retrying import _Raw, _RetryingClient
from groundloop.llm.structured import JsonSchema, tool_input_text

if TYPE_CHECKING:
    import anthropic
    import openai

    from groundloop.llm.client import LLMSettings, ModelSpec

log = logging.getLogger("groundloop.llm.client")


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
            # The SDK is imported lazily (untyped), so isinstance above cannot narrow `exc`.
            return _retryable_status(cast("openai.APIStatusError", exc).status_code)
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
            # 529 "overloaded" is >= 500; cast: see OpenAIClient._retryable.
            return _retryable_status(cast("anthropic.APIStatusError", exc).status_code)
        return False


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        raise LLMError(f"the `{name}` package is missing: pip install 'groundloop[llm]'") from None
