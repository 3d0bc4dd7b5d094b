"""The API's write endpoints: start, stop and fork a search. Each only records a fact in the
log, exactly as the CLI does, and the services of a running groundloop deployment (evolver,
ideator, implementer, runners) do the work; the projections show it once the projector has
folded it.

They require `Authorization: Bearer <token>` equal to Settings.api_token
(GROUNDLOOP_API_TOKEN): without a configured token every write is refused (403, saying how
to set one), a missing or wrong token is 401. Tokens are compared in constant time.

Writes go through their own bus connection, named "cli-api": `permissions.role_of` maps it to
the "cli" role, which may publish SearchStarted, SearchStopped and history copies (a fork)
and nothing else, and signs them with the cli key. The read side's connection (live.py)
publishes nothing.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ConfigDict, Field

from groundloop import events as ev
from groundloop import search_request
from groundloop.api.live import BrokerLink
from groundloop.bus import Bus
from groundloop.execution.environment import Environment
from groundloop.guarded_publish import publish_event
from groundloop.history_fork import ForkError, fork
from groundloop.manifest import ManifestError
from groundloop.settings import Settings

WRITER_CONNECTION = "cli-api"  # role "cli" (permissions.role_of)
TOKEN_HELP = (
    "set GROUNDLOOP_API_TOKEN on the API server to a long random string (e.g. "
    '`python -c "import secrets; print(secrets.token_urlsafe(32))"`) and send it as '
    "`Authorization: Bearer <token>`"
)
STOP_STAGES = get_args(ev.SearchStopped.model_fields["stage"].annotation)
ENVIRONMENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a folder of environments_dir, no path

bearer = HTTPBearer(
    auto_error=False,
    description="Settings.api_token (GROUNDLOOP_API_TOKEN); write endpoints only",
)


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """403 when the server has no token (writes are off), 401 for a missing or wrong one."""
    configured = request.app.state.settings.api_token
    if configured is None or not configured.get_secret_value():
        raise HTTPException(
            status_code=403, detail=f"write endpoints are off: no API token is set; {TOKEN_HELP}"
        )
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), configured.get_secret_value().encode()):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API token: send `Authorization: Bearer <token>` with the "
            "server's GROUNDLOOP_API_TOKEN",
            headers={"WWW-Authenticate": "Bearer"},
        )


REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body is not JSON"},
    401: {"description": "missing or wrong token"},
    403: {"description": "the server has no API token: writes are off"},
    503: {"description": "no broker configured or reachable"},
}
router = APIRouter(tags=["control"], dependencies=[Depends(require_token)], responses=REFUSALS)


def writer_link(settings: Settings) -> BrokerLink:
    """The write connection ("cli-api", role cli): the one connection of the app that may
    publish."""
    return BrokerLink(
        settings,
        WRITER_CONNECTION,
        "no broker configured: set GROUNDLOOP_NATS_URL to the deployment's broker so the API "
        "can record the request in its log",
    )


class Recorded(BaseModel):
    """What the log now holds for the request."""

    search_id: str
    event_id: str  # the SearchStarted (start, fork) or SearchStopped (stop)
    seq: int  # its stream sequence
    created: bool  # False: the log already had this very event (the request was repeated)
    events: int = 1  # events the request consists of (a fork: its copies and SearchStarted)
    note: str


class StartSearch(BaseModel):
    """The choices of `groundloop search`; defaults are the CLI's."""

    model_config = ConfigDict(extra="forbid")

    env: str = Field(
        pattern=ENVIRONMENT_NAME, description="environment name (a folder of environments_dir)"
    )
    strategy: Literal["evolution", "best_of_n", "rl", "hybrid"] = "evolution"
    generations: int = Field(default=2, ge=1, le=10_000)
    ideas: int = Field(default=3, ge=1, le=10_000, description="ideas per generation")
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    search_id: str | None = Field(
        default=None,
        pattern=ev.SEARCH_ID_PATTERN,
        description="default <env>-<strategy>-s<seed>, as the CLI names it",
    )
    model: str | None = Field(
        default=None, description="ideator model (provider:model[@url]); none: knob proposer"
    )
    implementer_model: str | None = Field(default=None, description="default: model")
    ideas_per_call: int = Field(default=10, ge=1, le=1000)
    samples: int = Field(default=2, ge=1, le=100)
    revisions: int = Field(default=2, ge=0, le=100)
    edit_format: Literal["diff", "search-replace", "whole-file"] | None = None
    baseline_seeds: int = Field(default=1, ge=1, le=1000)
    final_top_k: int = Field(default=1, ge=0, le=1000)
    final_seeds: int = Field(default=2, ge=1, le=1000)
    max_runs: int | None = Field(default=None, ge=1)
    gpu_hours: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    dollars: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    deadline: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="seconds before a generation closes anyway (default: from the budget, "
        "for one run at a time)",
    )
    rl: ev.RLSettings | None = Field(
        default=None, description="strategy rl or hybrid only (default: the CLI's defaults)"
    )
    schedule: Literal["generational", "steady"] = Field(
        default="generational",
        description="steady (evolution only): a generation opens once half of the previous "
        "one has results",
    )


class ForkSearch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    from_generation: int = Field(ge=0, description="generations before it are copied")
    new_search_id: str = Field(pattern=ev.SEARCH_ID_PATTERN)
    strategy: Literal["evolution", "best_of_n", "rl", "hybrid"] | None = Field(
        default=None, description="default: the source's"
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="default: the source's")


class StopSearch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="stopped by the user through the API", min_length=1, max_length=500)


SearchIdPath = Annotated[str, Path(pattern=ev.SEARCH_ID_PATTERN)]


async def last_event(bus: Bus, subject: str) -> ev.Event | None:
    """The last event on `subject` (a filter), read by sequence: no consumer is created, so
    checks before a write cost the broker nothing. A forged or undecodable entry is None."""
    try:
        msg = await bus.js.get_last_msg(bus.settings.stream, subject)
    except NotFoundError:
        return None
    entry = await bus.read(msg.subject, msg.data or b"", msg.seq, dict(msg.headers or {}))
    return entry if isinstance(entry, ev.Event) else None


async def started_event(bus: Bus, search_id: str) -> ev.SearchStarted | None:
    found = await last_event(bus, bus.subject_filter(search_id=search_id, type="SearchStarted"))
    return found if isinstance(found, ev.SearchStarted) else None


def unprocessable(loc: tuple[str | int, ...], message: str) -> RequestValidationError:
    """A 422 in FastAPI's documented shape (HTTPValidationError), for checks the request
    schema cannot express (an environment that is not installed, a fork that cannot be)."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message}])


def _same_start(a: ev.SearchStarted, b: ev.SearchStarted) -> bool:
    exclude = {"occurred_at", "price_table"}  # prices in force may change between requests
    return a.model_dump(exclude=exclude) == b.model_dump(exclude=exclude)


def build_start(settings: Settings, body: StartSearch) -> ev.SearchStarted:
    """The SearchStarted the CLI would publish for the same choices; 422 with the reason."""
    try:
        env = Environment.load(body.env, settings.environments_dir)
    except (ManifestError, OSError) as exc:
        raise unprocessable(("body", "env"), str(exc)) from None
    if body.rl is not None and body.strategy not in search_request.RL_STRATEGIES:
        raise unprocessable(
            ("body", "rl"), f"rl: applies to strategy rl or hybrid, not {body.strategy}"
        )
    rl = body.rl or (ev.RLSettings() if body.strategy in search_request.RL_STRATEGIES else None)
    prices: dict[str, ev.ModelPrice] = {}
    try:
        if body.model:
            prices, _ = search_request.priced_models(
                [body.model, body.implementer_model or body.model], None
            )
        return search_request.search_started_event(
            body.search_id or f"{env.name}-{body.strategy.replace('_', '-')}-s{body.seed}",
            env,
            strategy=body.strategy,
            generations=body.generations,
            ideas=body.ideas,
            seed=body.seed,
            model=body.model,
            implementer_model=body.implementer_model,
            baseline_seeds=body.baseline_seeds,
            final_top_k=body.final_top_k,
            final_seeds=body.final_seeds,
            budgets=ev.Budgets(
                max_runs=body.max_runs, gpu_hours=body.gpu_hours, dollars=body.dollars
            ),
            deadline=body.deadline
            if body.deadline is not None
            else search_request.default_deadline(env, body.ideas, 1),
            price_table=prices,
            ideas_per_call=body.ideas_per_call,
            samples=body.samples,
            revisions=body.revisions,
            edit_format=body.edit_format,
            rl=rl,
            schedule=body.schedule,
        )
    except ValueError as exc:  # a model without a price, a model name that does not parse,
        # a schedule the strategy cannot follow
        field = "schedule" if str(exc).startswith("schedule ") else "model"
        raise unprocessable(("body", field), str(exc)) from None


@router.post(
    "/searches",
    response_model=Recorded,
    status_code=201,
    responses={
        200: {"model": Recorded, "description": "the same request was recorded before"},
        409: {"description": "this search id was started with other choices"},
    },
)
async def start_search(request: Request, response: Response, body: StartSearch) -> Recorded:
    """Record a new search: publishes its SearchStarted (signed by the cli role), built from
    the same choices and defaults as `groundloop search`. This only records the request: the
    services of a running groundloop deployment (`python -m groundloop.<role>` processes or
    `groundloop up`) pick it up and do the work; nothing runs inside the API. Repeating the
    same request stores nothing new (`created: false`); the same search id with other
    choices is refused (409)."""
    started = build_start(request.app.state.settings, body)
    bus = await request.app.state.writer.bus()
    held = await started_event(bus, started.search_id)
    if held is not None and not _same_start(held, started):
        raise HTTPException(
            status_code=409,
            detail=f"search {started.search_id!r} was already started with other choices; "
            "choose another search_id",
        )
    published = await publish_event(bus, started)
    created = held is None and not published.duplicate
    response.status_code = 201 if created else 200
    return Recorded(
        search_id=started.search_id,
        event_id=started.event_id,
        seq=published.seq,
        created=created,
        note="recorded: the deployment's services start the search; follow it at "
        f"/searches/{started.search_id} or GET /live",
    )


@router.post(
    "/searches/{search_id}/stop",
    response_model=Recorded,
    responses={
        404: {"description": "the log has no such search"},
        409: {"description": "the search has already ended"},
    },
)
async def stop_search(
    search_id: SearchIdPath, request: Request, body: StopSearch | None = None
) -> Recorded:
    """Stop a search: publishes SearchStopped (stage "user"); the evolver dispatches nothing
    more, and the projections mark the search stopped. 404 when the log has no such search,
    409 when it has already ended."""
    bus = await request.app.state.writer.bus()
    if await started_event(bus, search_id) is None:
        raise HTTPException(status_code=404, detail=f"no search {search_id!r} in the log")
    stopped = ev.SearchStopped(
        event_id=ev.stable_id(search_id, "SearchStopped", "user"),
        search_id=search_id,
        producer="cli",
        stage="user",
        reason=(body or StopSearch()).reason,
    )
    ends = [bus.subject_filter(search_id=search_id, type="SearchCompleted")] + [
        bus.subject_filter(search_id=search_id, type="SearchStopped", key=stage)
        for stage in STOP_STAGES
        if stage != "user"
    ]
    for subject in ends:
        ended = await last_event(bus, subject)
        if ended is not None:
            reason = getattr(ended, "reason", None)
            raise HTTPException(
                status_code=409,
                detail=f"search {search_id!r} has already ended ({ended.TYPE}"
                + (f": {reason})" if reason else ")"),
            )
    published = await publish_event(bus, stopped)
    return Recorded(
        search_id=search_id,
        event_id=stopped.event_id,
        seq=published.seq,
        created=not published.duplicate,
        note="recorded: the search's services stop dispatching work",
    )


@router.post(
    "/searches/{search_id}/fork",
    response_model=Recorded,
    status_code=201,
    responses={
        200: {"model": Recorded, "description": "the same fork was recorded before"},
        404: {"description": "the log has no such source search"},
        409: {"description": "the new search id is another search already"},
    },
)
async def fork_search(
    search_id: SearchIdPath, request: Request, response: Response, body: ForkSearch
) -> Recorded:
    """Start a new search from generation `from_generation` of a recorded one, as `groundloop
    fork` does: copies of its past (producer "history:…", so no service redoes that work),
    then a SearchStarted of the new search, which the deployment's services continue. Every
    id is derived, so repeating the request stores nothing new. 404: no such source; 409: the
    new id is another search already; 422: the source cannot be forked there (the message
    says why)."""
    bus = await request.app.state.writer.bus()
    if await started_event(bus, search_id) is None:  # checked without reading the log
        raise HTTPException(status_code=404, detail=f"no search {search_id!r} in the log")
    source = [e async for e in bus.events(search_id)]
    try:
        events = fork(
            source, body.new_search_id, body.from_generation, strategy=body.strategy, seed=body.seed
        )
    except ForkError as exc:
        raise unprocessable(("body", "from_generation"), str(exc)) from None
    started = events[-1]
    assert isinstance(started, ev.SearchStarted)
    held = await started_event(bus, body.new_search_id)
    if held is not None and not _same_start(held, started):
        raise HTTPException(
            status_code=409,
            detail=f"search {body.new_search_id!r} already exists; choose another new_search_id",
        )
    stored, last = 0, None
    for event in events:
        last = await publish_event(bus, event)
        stored += not (last.duplicate or last.refused)
    assert last is not None
    response.status_code = 201 if stored else 200
    return Recorded(
        search_id=body.new_search_id,
        event_id=started.event_id,
        seq=last.seq,
        created=stored > 0,
        events=len(events),
        note=f"recorded: {len(events) - 1} copied events and the new SearchStarted; the "
        "deployment's services continue it",
    )
