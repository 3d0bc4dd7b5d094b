"""Dependencies of the read API's routes, as `Annotated` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from sqlmodel import Session, SQLModel

from groundloop.api.store import SearchRow


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many rows")]
# SQLite stores 64-bit integers: a larger number in a filter would fail inside the driver (a
# 500), so the schema bounds them and such a request is a 422.
SQL_INT_MAX = 2**63 - 1
Offset = Annotated[int, Query(ge=0, le=SQL_INT_MAX, description="skip this many rows first")]


def found(row: SQLModel | None, what: str, key: str) -> SQLModel:
    """The row, or a 404 that names what was missing."""
    if row is None:
        raise HTTPException(status_code=404, detail=f"{what} {key!r} not found in the projections")
    return row


def search_or_404(session: Session, search_id: str) -> SearchRow:
    return found(session.get(SearchRow, search_id), "search", search_id)  # type: ignore[return-value]
