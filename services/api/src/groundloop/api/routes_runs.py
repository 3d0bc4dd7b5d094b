"""A run's log and a patch's diff, read from the object store.

Runners stream a run's output in chunks while it runs (groundloop.runner.logs):
`logs/<run_id>/<attempt>/<chunk:06d>`, and `logs/<run_id>/<attempt>/index` once it ended;
RunCompleted.log_key is `logs/<run_id>/<attempt>`. The layout is read here from its
description rather than by importing the runner (the api service does not depend on it).
While a run is running its key comes from RunStarted's attempt, and the chunks stored so
far are the log so far: the page asks again from `next_chunk` to follow it.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse
from nats.js.errors import NotFoundError
from pydantic import BaseModel

from groundloop.api.deps import SessionDep, found
from groundloop.api.store import PatchRow, RunRow
from groundloop.bus import Bus

router = APIRouter(
    tags=["runs"],
    responses={
        404: {"description": "no such run or patch, or nothing stored for it"},
        503: {"description": "no broker configured or reachable"},
    },
)

MAX_CHUNKS_PER_CALL = 64  # the runner's chunks are ≤ 64 KiB: ≤ 4 MiB per answer


class RunLog(BaseModel):
    run_id: str
    key: str  # the object-store prefix of the log
    status: str  # the run's status when read
    complete: bool  # the runner stored the index: nothing more will come
    from_chunk: int
    next_chunk: int  # ask again from here for what follows
    total_chunks: int | None  # known once complete
    text: str  # chunks [from_chunk, next_chunk), UTF-8 (undecodable bytes replaced)
    dropped_bytes: int = 0  # output past the runner's log cap, never stored


def log_prefix(run: RunRow) -> str | None:
    if run.log_key:
        return run.log_key
    if run.started_at is None:
        return None  # not started: no log yet
    return f"logs/{run.run_id}/{run.attempt or 1}"


async def _get(bus: Bus, key: str) -> bytes | None:
    try:
        return await bus.get_artifact(key)
    except NotFoundError:
        return None


@router.get("/runs/{run_id}/log", response_model=RunLog)
async def run_log(
    run_id: str,
    request: Request,
    session: SessionDep,
    from_chunk: Annotated[int, Query(ge=0, description="first chunk to return")] = 0,
) -> RunLog:
    """The run's log from the object store: the whole log once the run ended, the chunks
    stored so far while it runs (poll again from `next_chunk`)."""
    run: RunRow = found(session.get(RunRow, run_id), "run", run_id)  # type: ignore[assignment]
    prefix = log_prefix(run)
    if prefix is None:
        raise HTTPException(
            status_code=404, detail=f"run {run_id!r} has not started: it has no log yet"
        )
    bus: Bus = await request.app.state.broker.bus()
    raw_index = await _get(bus, f"{prefix}/index")
    index = json.loads(raw_index) if raw_index is not None else None
    last = index["chunks"] if index is not None else None
    parts: list[bytes] = []
    chunk = from_chunk
    while len(parts) < MAX_CHUNKS_PER_CALL and (last is None or chunk < last):
        data = await _get(bus, f"{prefix}/{chunk:06d}")
        if data is None:
            break  # not written yet (running) or lost: the index says which
        parts.append(data)
        chunk += 1
    if index is None and run.completed_at is not None and not parts and from_chunk == 0:
        raise HTTPException(
            status_code=404,
            detail=f"run {run_id!r} ended but no log is stored under {prefix!r} (the runner "
            "could not reach the object store, or the bucket was emptied)",
        )
    return RunLog(
        run_id=run_id,
        key=prefix,
        status=run.status,
        complete=index is not None and chunk >= index["chunks"],
        from_chunk=from_chunk,
        next_chunk=chunk,
        total_chunks=last,
        text=b"".join(parts).decode("utf-8", errors="replace"),
        dropped_bytes=int(index.get("dropped", 0)) if index is not None else 0,
    )


@router.get("/patches/{patch_id}/diff", response_class=PlainTextResponse)
async def patch_diff(patch_id: str, request: Request, session: SessionDep) -> PlainTextResponse:
    """The patch's unified diff as text, from the projection or, for a large diff, from the
    object store (PatchReady carries its key instead)."""
    patch: PatchRow = found(session.get(PatchRow, patch_id), "patch", patch_id)  # type: ignore[assignment]
    if patch.diff is not None:
        return PlainTextResponse(patch.diff)
    if patch.diff_key is None:
        raise HTTPException(status_code=404, detail=f"patch {patch_id!r} has no diff recorded")
    bus: Bus = await request.app.state.broker.bus()
    data = await _get(bus, patch.diff_key)
    if data is None:
        raise HTTPException(
            status_code=404,
            detail=f"patch {patch_id!r}: its diff {patch.diff_key!r} is not in the object store",
        )
    return PlainTextResponse(data.decode("utf-8", errors="replace"))
