"""Run the implementer service: `python -m groundloop.implementer`.

Consumes IdeaProposed, emits PatchReady or PatchFailed (see service.py). Settings from GROUNDLOOP_*
variables; model keys from OPENAI_API_KEY / ANTHROPIC_API_KEY (see groundloop.llm).
SIGTERM or Ctrl-C: stop fetching, finish the idea in hand, exit.
"""

from __future__ import annotations

import asyncio
import signal

from groundloop.implementer.service import run
from groundloop.llm import LLMSettings
from groundloop.settings import Settings
from groundloop.telemetry import configure_logging, configure_tracing


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(settings, stop, llm_settings=LLMSettings())


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    configure_tracing(settings, "implementer")
    asyncio.run(_main(settings))


if __name__ == "__main__":
    main()
