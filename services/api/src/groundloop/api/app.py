"""The read API over the projections (searches, ideas, runs, leaderboard, lineage) and the
dashboard that shows them.

The JSON routes read only the SQL tables the projector writes (groundloop.api.store). The
bus is read for what is not projected: the live feed (`/live`, groundloop.api.live), run logs
and large diffs (the object store, groundloop.api.routes_runs), and the analyses
(groundloop.api.routes_analysis, from the log as `groundloop analyze` reads it). The only
writes are routes_control's (start, stop, fork), behind a bearer token, on a connection of
their own as the cli role. The dashboard is plain ES
modules and CSS under static/, served as they are (no build step, nothing from a CDN) at `/`;
every number it shows comes from the documented JSON routes (`/docs`). Serve it
with `python -m groundloop.api` (which also runs the projector), or build it in a test with
`create_app(settings)` or `create_app(engine=...)` and FastAPI's TestClient.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from nats.errors import Error as NatsError
from sqlalchemy import Engine

from groundloop.api import (
    routes_analysis,
    routes_control,
    routes_dashboard,
    routes_ideas,
    routes_runs,
    routes_searches,
)
from groundloop.api.live import BrokerLink
from groundloop.api.live import router as live_router
from groundloop.api.store import create_tables, make_engine
from groundloop.settings import Settings

STATIC = Path(__file__).parent / "static"


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """The API over `engine`, or over the database `settings` names (default Settings())."""
    settings = settings or Settings()
    owned = engine is None
    engine = engine or make_engine(settings.resolved_db_url())
    broker = BrokerLink(settings)
    writer = routes_control.writer_link(settings)  # the one connection that may publish
    create_tables(engine)  # a fresh install answers with empty lists, not errors

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await broker.close()
        await writer.close()
        if owned:  # an engine passed in belongs to the caller
            engine.dispose()

    app = FastAPI(
        lifespan=lifespan,
        title="groundloop",
        version=version("groundloop-api"),
        description="Read API over groundloop's projections of the event log, the analyses of "
        "`groundloop analyze`, and write endpoints (start, stop, fork a search) that record "
        "requests in the log for a running deployment's services; writes need "
        "`Authorization: Bearer <GROUNDLOOP_API_TOKEN>`.",
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.broker = broker
    app.state.writer = writer
    app.state.analysis_measures = {}  # similarity measures, loaded once (routes_analysis)
    app.state.analysis_cache = OrderedDict()  # analyses by (search, measure), per log state
    app.state.closing = False  # set by whoever stops the server: open live feeds end
    app.include_router(routes_searches.router)
    app.include_router(routes_ideas.router)
    app.include_router(routes_runs.router)
    app.include_router(routes_dashboard.router)
    app.include_router(routes_analysis.router)
    app.include_router(routes_control.router)
    app.include_router(live_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(NatsError)
    async def broker_failed(_: Request, exc: NatsError) -> JSONResponse:
        # The broker refused or dropped a read or write (a limit reached, a restart): say so
        # as the documented 503 rather than failing with a traceback.
        return JSONResponse(
            status_code=503,
            content={
                "detail": f"the broker could not serve this request ({exc}); try again, and if "
                "it persists check the broker's health and limits"
            },
        )

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        # no-cache: a new version of the page is picked up by a reload, not after a day
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health", tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": version("groundloop-api")}

    return app
