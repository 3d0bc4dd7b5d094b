"""Run the evolver alone: `python -m groundloop.evolver` (needs GROUNDLOOP_NATS_URL).

Consumes SearchStarted, IdeaProposed, PatchReady/PatchFailed, RunRequested/RunStarted/
RunCompleted, GenerationAdvanced and SearchCompleted; emits RunRequested, GenerationAdvanced
and SearchCompleted (see service.py). SIGTERM or Ctrl-C stops it after the event in hand.
"""

from __future__ import annotations

import asyncio
import signal

from groundloop import telemetry
from groundloop.settings import Settings

from .service import run


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(settings, stop)


def main() -> None:
    settings = Settings()
    telemetry.configure_logging(settings)
    telemetry.configure_tracing(settings, "evolver")
    asyncio.run(_main(settings))


if __name__ == "__main__":
    main()
