"""How the ideator says a generation or a search ended early: IdeasShortfall when a
generation got fewer ideas than planned after its re-asks, SearchStopped when the model (or
the search's settings) would fail every call. Used by `groundloop.ideator.service`."""

from __future__ import annotations

from groundloop.events import Event, SearchStopped, stable_id
from groundloop.llm.client import LLMTimeout, LLMUnreachable, MissingAPIKey, ModelNotServed
from groundloop.llm.errors import ModelSpecError

# Model failures that the same settings meet on every call: retrying only hides them.
LLM_STOPS: tuple[type[Exception], ...] = (
    LLMUnreachable,
    ModelNotServed,
    LLMTimeout,
    MissingAPIKey,
    ModelSpecError,
)


def search_stopped(cause: Event, producer: str, exc: Exception) -> SearchStopped:
    """SearchStopped for `exc`; its id is one per search and producer, so every generation
    that meets the same failure re-publishes the same event (JetStream drops the copies)."""
    return SearchStopped(
        event_id=stable_id("SearchStopped", cause.search_id, producer),
        search_id=cause.search_id,
        causation_id=cause.event_id,
        producer=producer,
        stage="ideator",
        reason=str(exc) or type(exc).__name__,
        error_type=type(exc).__name__,
    )


def shortfall_reason(calls: int, empty_calls: int, rejected: int, dropped: int) -> str:
    """Why a generation is short, in the counts an operator can act on."""
    parts = [f"{calls} model call(s)"]
    if empty_calls:
        parts.append(f"{empty_calls} without a parsable idea")
    if rejected:
        parts.append(f"{rejected} idea(s) rejected as template echoes")
    if dropped:
        parts.append(f"{dropped} duplicate(s) or slot(s) with no untried setting dropped")
    return "; ".join(parts)
