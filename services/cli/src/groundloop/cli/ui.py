"""`groundloop ui`: serve the dashboard over any store, live or finished, local or remote.

Reads the projections GROUNDLOOP_DB_URL names and follows the broker GROUNDLOOP_NATS_URL names
(without one, the embedded broker under GROUNDLOOP_DATA_DIR is started or reused, as every
command does). A running `groundloop search` already projects its events; against a remote
broker with no projector of its own, pass --projector to fold events into the store here.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer

from groundloop.settings import Settings


def ui(
    host: Annotated[
        str, typer.Option(help="address to listen on (0.0.0.0: every interface)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0: any free port)", min=0, max=65535)] = 8765,
    projector: Annotated[
        bool,
        typer.Option(
            help="also fold the broker's events into the store (only where no other projector "
            "writes this store: the projector role assumes one writer)"
        ),
    ] = False,
) -> None:
    """Serve the dashboard (and the JSON API, documented at /docs) until Ctrl-C."""
    from groundloop.api.serve import DashboardError, start_dashboard
    from groundloop.cli.main import connected_settings, console, run_async

    with connected_settings(Settings()) as settings:

        async def serve() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                dashboard = await start_dashboard(settings, host, port)
            except DashboardError as exc:
                console.print(f"[red]{exc}[/]")
                raise typer.Exit(2) from None
            tasks = []
            if projector:
                from groundloop.api.service import run as run_projector

                tasks.append(asyncio.create_task(run_projector(settings, stop)))
            console.print(
                f"dashboard on [bold]{dashboard.url}[/] (store {settings.resolved_db_url()}, "
                f"broker {settings.nats_url}); Ctrl-C stops it"
            )
            await stop.wait()
            await dashboard.stop()
            await asyncio.gather(*tasks)

        run_async(serve())
