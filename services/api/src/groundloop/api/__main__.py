"""Run the api service: the projector (bus → SQL) and the HTTP read API, in one process.

    python -m groundloop.api [--host 127.0.0.1] [--port 8000] [--no-projector] [--no-http]

Settings come from GROUNDLOOP_* variables (GROUNDLOOP_NATS_URL, GROUNDLOOP_DB_URL, …).
SIGINT/SIGTERM stop both: the HTTP server finishes its requests, the projector its event.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from groundloop import telemetry
from groundloop.settings import Settings


async def serve(settings: Settings, host: str, port: int, projector: bool, http: bool) -> None:
    from groundloop.api import service

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    tasks = [service.run(settings, stop)] if projector else []
    if http:
        import uvicorn

        from groundloop.api.app import create_app

        server = uvicorn.Server(
            uvicorn.Config(create_app(settings), host=host, port=port, log_config=None)
        )

        async def http_until_stopped() -> None:
            # uvicorn handles the signals while it serves and re-raises them when done.
            await server.serve()
            stop.set()

        tasks.append(http_until_stopped())
    await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m groundloop.api", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-projector", action="store_true", help="serve the API only")
    parser.add_argument("--no-http", action="store_true", help="run the projector only")
    args = parser.parse_args()
    settings = Settings()
    telemetry.configure_logging(settings)
    telemetry.configure_tracing(settings, "api")
    asyncio.run(serve(settings, args.host, args.port, not args.no_projector, not args.no_http))


if __name__ == "__main__":
    main()
