"""Waiting for something to happen, with a deadline, for tests that cannot subscribe to it.

Prefer waiting on the event itself (an asyncio.Event, a Collector, a queue). Where the only
signal is state to look at (a row count, a file, the log), these poll it briefly and fail
with `what` once the deadline passes, so no test hopes a fixed sleep was long enough.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    condition: Callable[[], T | Awaitable[T]],
    *,
    timeout: float,
    what: str = "the condition",
    interval: float = 0.05,
) -> T:
    """Await until `condition()` (sync or async) is truthy and return its value; raise
    AssertionError naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(interval)


def eventually_sync(
    condition: Callable[[], T],
    *,
    timeout: float,
    what: str = "the condition",
    interval: float = 0.05,
) -> T:
    """`eventually` for code outside an event loop (subprocesses, files)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)
