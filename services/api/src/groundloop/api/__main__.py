"""Run the api service: the projector (bus → SQL) and the HTTP read API, in one process.

    python -m groundloop.api [--host 127.0.0.1] [--port 8000] [--no-projector] [--no-http]

Settings come from GROUNDLOOP_* variables (GROUNDLOOP_NATS_URL, GROUNDLOOP_DB_URL, …).
The projector is the role (groundloop.api.service.PROJECTOR); the HTTP server runs beside it
(groundloop.skeleton.serve). SIGINT/SIGTERM stop both: the HTTP server finishes its
requests, the projector its event; either one ending stops the other.
"""

from __future__ import annotations

import argparse
import asyncio

from groundloop.api.service import PROJECTOR
from groundloop.settings import Settings
from groundloop.skeleton import Companion, serve


def http_server(host: str, port: int) -> Companion:
    async def serve_http(settings: Settings, stop: asyncio.Event) -> None:
        import uvicorn

        from groundloop.api.serve import server_config

        # Bounded shutdown: an open dashboard tab's live feed never ends by itself.
        config = server_config(settings, host, port)
        app = config.app  # the FastAPI app itself (server_config passes it, not an import string)
        server = uvicorn.Server(config)

        async def exit_on_stop() -> None:
            await stop.wait()
            app.state.closing = True  # type: ignore[union-attr]  # live feeds end at once
            server.should_exit = True  # the projector ended: finish the requests in hand

        watcher = asyncio.create_task(exit_on_stop())
        try:
            # uvicorn handles the signals while it serves and re-raises them when done.
            await server.serve()
        finally:
            watcher.cancel()

    return serve_http


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m groundloop.api", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-projector", action="store_true", help="serve the API only")
    parser.add_argument("--no-http", action="store_true", help="run the projector only")
    args = parser.parse_args(argv)
    serve(
        "api",
        None if args.no_projector else lambda _settings: PROJECTOR,
        beside=[] if args.no_http else [http_server(args.host, args.port)],
    )


if __name__ == "__main__":
    main()
