"""What a model call raises: the `LLMError` family, each with a message that says why and what
to do, and `retryable`, which tells a service whether trying the whole job later can help.

Split out of `groundloop.llm.providers` (which re-exports them, as does `groundloop.llm.client`)
so that `groundloop.llm.limits` can raise them without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from groundloop.llm.client import ModelSpec


class LLMError(RuntimeError):
    """A model call that failed for good (after retries); the message says why and what to do."""

    retryable = True  # worth trying the whole job again later (e.g. the provider was down)


class ModelSpecError(LLMError, ValueError):
    retryable = False


class MissingAPIKey(LLMError):
    retryable = False


class DollarBudgetSpent(LLMError):
    """The search's dollar budget would be exceeded by the next model call: stop, do not call."""

    retryable = False


class LLMRequestRejected(LLMError):
    """The provider refused the request itself (bad key, unknown model, invalid request)."""

    retryable = False


# ------------------------------------------------------------------ describing failures


def retryable_status(status: int | None) -> bool:
    return status in (408, 409, 425, 429) or (status is not None and status >= 500)


def retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        return float(headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None


def describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {text}"


def hint(spec: ModelSpec, status: int | None) -> str:
    if status in (401, 403):
        var = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}.get(
            spec.provider, "GROUNDLOOP_LLM_COMPATIBLE_API_KEY"
        )
        return f"the key was rejected: check {var}"
    if status == 404:
        return f"check the model name {spec.model!r} and the base URL"
    return "check the model name and settings"
