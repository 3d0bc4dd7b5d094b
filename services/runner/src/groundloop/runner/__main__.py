"""`python -m groundloop.runner [--slots N | --gpus 0,1,2,3 --gpus-per-run 1] [--resource-class cpu]`

Settings: GROUNDLOOP_* (broker, data dir; groundloop.settings) and GROUNDLOOP_RUNNER_* or the
flags below (groundloop.runner.slots.RunnerSettings). SIGTERM/SIGINT: stop fetching, finish or
hand back the current runs, exit.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from groundloop import telemetry
from groundloop.runner.service import run
from groundloop.runner.slots import RunnerSettings
from groundloop.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m groundloop.runner", description=__doc__.split("\n")[0]
    )
    for name in (
        "resource-class",
        "slots",
        "gpus",
        "gpus-per-run",
        "backend",
        "image",
        "shutdown-grace-s",
        "runner-id",
    ):
        parser.add_argument(f"--{name}")
    flags = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    settings, runner = Settings(), RunnerSettings(**flags)
    telemetry.configure_logging(settings)
    telemetry.configure_tracing(settings, "runner")

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, runner, stop)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
