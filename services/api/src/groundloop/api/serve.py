"""Serve the API and dashboard from inside another asyncio program (`groundloop search`,
`groundloop ui`, tests): uvicorn runs as a task of the current event loop.

    handle = await start_dashboard(settings, port=8765)
    print(handle.url)
    ...
    await handle.stop()

Port 0 picks a free port (the handle's url has the real one). A port in use is refused with
a message that says so and how to choose another.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import uvicorn
from sqlalchemy import Engine

from groundloop.api.app import create_app
from groundloop.settings import Settings

GRACEFUL_SHUTDOWN_S = 2.0  # live feeds never end by themselves: close them after this long
STARTUP_TIMEOUT_S = 15.0


class DashboardError(RuntimeError):
    pass


def server_config(
    settings: Settings, host: str, port: int | None = None, *, engine: Engine | None = None
) -> uvicorn.Config:
    """The uvicorn config every way of serving the app uses (logs through groundloop's
    logging, bounded shutdown so open live feeds cannot hold it up)."""
    return uvicorn.Config(
        create_app(settings, engine=engine),
        host=host,
        port=port or 0,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_S),
        lifespan="on",
    )


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: Ctrl-C belongs to the program it runs inside,
    which stops the dashboard through `Dashboard.stop`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Dashboard:
    url: str
    server: uvicorn.Server
    task: asyncio.Task
    _sockets: list[socket.socket] = field(default_factory=list)

    async def stop(self) -> None:
        """Stop serving: close live feeds, finish requests in hand, then return."""
        self.server.config.app.state.closing = True  # type: ignore[union-attr]
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        for sock in self._sockets:
            sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DashboardError(
                f"port {port} on {host} is in use: choose another with --ui-port "
                "(or 0 for any free port), or --no-ui to run without the dashboard"
            ) from None
        raise DashboardError(f"cannot listen on {host}:{port}: {exc}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def start_dashboard(
    settings: Settings, host: str = "127.0.0.1", port: int = 8765, *, engine: Engine | None = None
) -> Dashboard:
    """Serve the API and dashboard on host:port until `stop()`; returns once it accepts
    connections. Binding first (here) makes a port in use a clear error, not a log line."""
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    server = EmbeddedServer(server_config(settings, host, bound_port, engine=engine))
    task = asyncio.create_task(server.serve(sockets=[sock]), name="dashboard")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT_S
    while not server.started:
        if task.done():
            sock.close()
            exc = task.exception()
            raise DashboardError(f"the dashboard did not start: {exc!r}") from exc
        if loop.time() > deadline:
            server.should_exit = True
            sock.close()
            raise DashboardError(f"the dashboard did not start within {STARTUP_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.02)
    shown = f"[{host}]" if ":" in host else host
    return Dashboard(url=f"http://{shown}:{bound_port}/", server=server, task=task, _sockets=[sock])
