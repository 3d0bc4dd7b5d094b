"""Fitting calls to the model behind them: measured speed, output caps, per-endpoint
concurrency, and the errors that say a model cannot be used at all.

- `RateMeter`: output tokens per second, measured per model as calls complete, so that
  `cap_output_tokens` can size an answer to fit the request timeout. A 12 tokens/s CPU model
  cannot write 8192 tokens in 600 s; asking it to only buys a timeout and a regeneration.
- `endpoint_slot(url, limit)`: one semaphore per base URL, so a CPU-served model (one slot by
  default on localhost) is not handed several generations that all miss their timeout. The
  slots are per process: the ideator and implementer processes each hold their own.
- `unreachable_os_error`: the OS error under a connection failure (refused, unknown host, no
  route), which is a configuration problem to report at once, not a transient to retry.
- `check_model_name`: the model name against the server's model list, where it has one.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from groundloop.llm.errors import LLMError, LLMRequestRejected

log = logging.getLogger("groundloop.llm.client")

TIMEOUT_SHARE = 0.8  # of the timeout an answer may use at the measured speed
MIN_OUTPUT_TOKENS = 256  # below this no edit or idea fits: fail instead of shrinking further
MIN_MEASURED_TOKENS = 16  # shorter answers time mostly the prompt, not the generation
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


class LLMUnreachable(LLMError):
    """The model's server could not be reached at all (refused, unknown host, no route)."""

    retryable = False  # retrying a refused connection only delays the error the user must fix

    def __init__(self, message: str, url: str, os_error: str):
        super().__init__(message)
        self.url, self.os_error = url, os_error


class LLMTimeout(LLMError):
    """A generation did not fit the request timeout, even with a smaller output budget."""

    retryable = False  # the same settings would time out again later


class ModelNotServed(LLMRequestRejected):
    """The server lists its models and the requested one is not among them."""

    def __init__(self, message: str, available: list[str]):
        super().__init__(message)
        self.available = available


def is_local(url: str | None) -> bool:
    return bool(url) and (urlsplit(url).hostname or "") in _LOCAL_HOSTS  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- speed


class RateMeter:
    """Output tokens per second per model label: total tokens over total seconds of the last
    calls (a sum, not a mean of ratios, so one short answer does not swing it)."""

    def __init__(self, window: int = 8):
        self._window = window
        self._samples: dict[str, list[tuple[int, float]]] = {}
        self._lock = threading.Lock()

    def record(self, label: str, output_tokens: int, seconds: float) -> None:
        if output_tokens < MIN_MEASURED_TOKENS or seconds <= 0:
            return
        with self._lock:
            samples = self._samples.setdefault(label, [])
            samples.append((output_tokens, seconds))
            del samples[: -self._window]

    def tokens_per_s(self, label: str) -> float | None:
        with self._lock:
            samples = self._samples.get(label)
            if not samples:
                return None
            return sum(t for t, _ in samples) / sum(s for _, s in samples)

    def forget(self, label: str) -> None:
        with self._lock:
            self._samples.pop(label, None)


RATES = RateMeter()  # process-wide: every client of one model shares what was measured


def cap_output_tokens(configured: int, tokens_per_s: float | None, timeout_s: float) -> int:
    """max_tokens = min(configured, tokens/s x timeout x 0.8) once a speed is known."""
    if tokens_per_s is None:
        return configured
    fitting = int(tokens_per_s * timeout_s * TIMEOUT_SHARE)
    return max(min(configured, fitting), min(configured, MIN_OUTPUT_TOKENS))


def budget_after_timeout(label: str, budget: int, timeouts: int, timeout: float) -> int:
    """The output budget for the next try after a timeout, or LLMTimeout when there is none:
    the next try must ask for fewer tokens than the one that did not fit (at most once)."""
    rate = RATES.tokens_per_s(label)
    smaller = min(cap_output_tokens(budget, rate, timeout), budget // 2)
    speed = f"{rate:.1f} tokens/s measured" if rate else "no speed measured yet"
    if timeouts >= 2 or smaller < MIN_OUTPUT_TOKENS:
        raise LLMTimeout(
            f"{label}: the answer did not fit the {timeout:.0f}s request timeout ({timeouts} "
            f"time(s); last output budget {budget} tokens, {speed}); raise "
            "GROUNDLOOP_LLM_TIMEOUT_S or lower GROUNDLOOP_LLM_MAX_OUTPUT_TOKENS, or use a "
            "faster model"
        )
    log.warning(
        "%s: timed out after %.0fs with an output budget of %d tokens (%s); trying once more "
        "with %d",
        label,
        timeout,
        budget,
        speed,
        smaller,
    )
    return smaller


# ---------------------------------------------------------------------------- concurrency

_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def concurrency_for(url: str | None, configured: int | None) -> int | None:
    """The call limit for one endpoint: the setting, else 1 for a local server, else none."""
    if configured is not None:
        return configured
    return 1 if is_local(url) else None


@contextmanager
def endpoint_slot(url: str | None, limit: int | None) -> Iterator[None]:
    """Hold one of `limit` slots of the endpoint at `url` (no limit: hold nothing)."""
    if not limit or limit <= 0:
        yield
        return
    key = (url or "", limit)
    with _slots_lock:
        slot = _slots.setdefault(key, threading.BoundedSemaphore(limit))
    with slot:
        yield


# ---------------------------------------------------------------------------- reachability


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def unreachable_os_error(exc: BaseException) -> str | None:
    """'[Errno 111] Connection refused' (or the like) when `exc` comes from a connection that
    was never made; None for timeouts, resets mid-answer and everything else."""
    for cause in _chain(exc):
        if isinstance(cause, ConnectionRefusedError | socket.gaierror):
            return str(cause) or type(cause).__name__
        if isinstance(cause, OSError) and cause.errno in (101, 113, 65, 51):  # no route/network
            return str(cause)
    return None


def unreachable(label: str, url: str, os_error: str) -> LLMUnreachable:
    return LLMUnreachable(
        f"{label}: cannot reach the model server at {url} ({os_error}); start the server or "
        "fix the URL in the model setting (provider:model@http://host:port/v1)",
        url,
        os_error,
    )


# ---------------------------------------------------------------------------- model names


def served_name_matches(model: str, served: Iterable[str]) -> bool:
    """llama.cpp lists the loaded file (or its --alias) and Ollama 'name:tag': a name matches
    an id exactly, or the id's file name with or without its .gguf extension."""
    wanted = model.strip().lower()
    for name in served:
        base = name.strip().lower().rstrip("/").rsplit("/", 1)[-1]
        if wanted in (name.strip().lower(), base, base.removesuffix(".gguf")):
            return True
        if ":" not in wanted and base.split(":", 1)[0] == wanted:  # ollama's implicit :latest
            return True
    return False


def check_model_name(label: str, model: str, url: str, served: list[str]) -> None:
    if served and not served_name_matches(model, served):
        listing = ", ".join(sorted(served)[:20])
        raise ModelNotServed(
            f"{label}: the server at {url} does not serve a model named {model!r}; it serves: "
            f"{listing}. Use one of these names in the model setting",
            sorted(served),
        )
