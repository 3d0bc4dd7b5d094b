"""The body of a service's `__main__`: settings → logging and tracing → run until SIGTERM.

    serve("evolver", run)   # run(settings, stop) returns once `stop` is set and work in hand is done
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from groundloop.settings import Settings
from groundloop.telemetry import configure_logging, configure_tracing

ServiceRun = Callable[[Settings, asyncio.Event], Awaitable[None]]


def serve(name: str, run: ServiceRun) -> None:
    settings = Settings()
    configure_logging(settings)
    configure_tracing(settings, name)

    async def until_signalled() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    asyncio.run(until_signalled())
