"""The read API over the projections: searches, ideas, runs, leaderboard, lineage.

Reads only the SQL tables the projector writes (groundloop.api.store); never the bus. Serve it
with `python -m groundloop.api` (which also runs the projector), or build it in a test with
`create_app(settings)` or `create_app(engine=...)` and FastAPI's TestClient.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI
from sqlalchemy import Engine

from groundloop.api import routes_ideas, routes_searches
from groundloop.api.store import create_tables, make_engine
from groundloop.settings import Settings


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """The API over `engine`, or over the database `settings` names (default Settings())."""
    settings = settings or Settings()
    owned = engine is None
    engine = engine or make_engine(settings.resolved_db_url())
    create_tables(engine)  # a fresh install answers with empty lists, not errors

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:  # an engine passed in belongs to the caller
            engine.dispose()

    app = FastAPI(
        lifespan=lifespan,
        title="groundloop",
        version=version("groundloop-api"),
        description="Read API over groundloop's projections of the event log.",
    )
    app.state.settings = settings
    app.state.engine = engine
    app.include_router(routes_searches.router)
    app.include_router(routes_ideas.router)

    @app.get("/health", tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": version("groundloop-api")}

    return app
