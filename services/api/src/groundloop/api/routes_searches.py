"""Read routes for searches and what belongs to one: ideas, runs, generations, policies,
leaderboard."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import APIRouter, Query
from sqlalchemy import func
from sqlmodel import SQLModel, col, select

from groundloop.api import ranking
from groundloop.api.deps import SQL_INT_MAX, Limit, Offset, SessionDep, search_or_404
from groundloop.api.store import GenerationRow, IdeaRow, PolicyRow, RunRow, SearchRow
from groundloop.api.usage import model_usage

Generation = Annotated[
    int | None, Query(ge=-SQL_INT_MAX, le=SQL_INT_MAX, description="only this generation")
]

router = APIRouter(
    prefix="/searches",
    tags=["searches"],
    responses={404: {"description": "not found in the projections"}},
)


class SearchDetail(SQLModel):
    search: SearchRow
    ideas_by_status: dict[str, int]
    runs_by_status: dict[str, int]
    generations: list[GenerationRow]
    cost_usd: float  # every model call of the search (ideas, patches, failed patches)
    input_tokens: int
    output_tokens: int
    gpu_seconds: float


class LeaderboardEntry(SQLModel):
    """One idea on the search split (groundloop.ranking): `mean_*` over `runs` succeeded
    search-split runs, the number it is ranked by; `best_*` its best single such run. The
    final re-evaluation (on the manifest's final split) is in `final_*` and never ranks."""

    rank: int
    idea_id: str
    title: str | None
    mode: str | None
    generation: int | None
    proposer_kind: str | None
    proposer_model: str | None
    split: str = "search"
    runs: int
    mean_score: float
    mean_reward: float
    best_score: float
    best_reward: float
    best_run_id: str
    final_split: str = "final"
    final_runs: int = 0
    final_mean_score: float | None = None
    runs_succeeded: int  # every run of the idea, final re-evaluation included
    runs_completed: int


@router.get("", response_model=list[SearchRow])
def list_searches(
    session: SessionDep, status: str | None = None, limit: Limit = 100, offset: Offset = 0
) -> list[SearchRow]:
    query = select(SearchRow)
    if status is not None:
        query = query.where(SearchRow.status == status)
    # Newest first; searches only known from later events (no SearchStarted yet) go last.
    query = query.order_by(
        col(SearchRow.started_at).is_(None), col(SearchRow.started_at).desc(), SearchRow.search_id
    )
    return list(session.exec(query.offset(offset).limit(limit)))


@router.get("/{search_id}", response_model=SearchDetail)
def get_search(search_id: str, session: SessionDep) -> SearchDetail:
    search = search_or_404(session, search_id)
    ideas = session.exec(
        select(IdeaRow.status, func.count())
        .where(IdeaRow.search_id == search_id)
        .group_by(IdeaRow.status)
    ).all()
    runs = session.exec(
        select(RunRow.status, func.count())
        .where(RunRow.search_id == search_id)
        .group_by(RunRow.status)
    ).all()
    generations = session.exec(
        select(GenerationRow)
        .where(GenerationRow.search_id == search_id)
        .order_by(col(GenerationRow.generation))
    ).all()
    usage = model_usage(session, search_id)
    # coalesce(…, 0.0) is never NULL, but SQLAlchemy types it after its (nullable) first argument.
    gpu_seconds = cast(
        float,
        session.exec(
            select(func.coalesce(func.sum(RunRow.gpu_seconds), 0.0)).where(
                RunRow.search_id == search_id
            )
        ).one(),
    )
    return SearchDetail(
        search=search,
        ideas_by_status=dict(ideas),
        runs_by_status=dict(runs),
        generations=list(generations),
        cost_usd=usage.cost_usd,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        gpu_seconds=float(gpu_seconds),
    )


@router.get("/{search_id}/ideas", response_model=list[IdeaRow])
def list_ideas(
    search_id: str,
    session: SessionDep,
    generation: Generation = None,
    status: str | None = None,
    mode: str | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[IdeaRow]:
    search_or_404(session, search_id)
    query = select(IdeaRow).where(IdeaRow.search_id == search_id)
    for column, value in (
        (IdeaRow.generation, generation),
        (IdeaRow.status, status),
        (IdeaRow.mode, mode),
    ):
        if value is not None:
            query = query.where(column == value)
    query = query.order_by(col(IdeaRow.generation), col(IdeaRow.proposed_at), col(IdeaRow.idea_id))
    return list(session.exec(query.offset(offset).limit(limit)))


@router.get("/{search_id}/runs", response_model=list[RunRow])
def list_runs(
    search_id: str,
    session: SessionDep,
    status: str | None = None,
    purpose: str | None = None,
    idea_id: str | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[RunRow]:
    search_or_404(session, search_id)
    query = select(RunRow).where(RunRow.search_id == search_id)
    for column, value in (
        (RunRow.status, status),
        (RunRow.purpose, purpose),
        (RunRow.idea_id, idea_id),
    ):
        if value is not None:
            query = query.where(column == value)
    first_seen = func.coalesce(RunRow.requested_at, RunRow.started_at, RunRow.completed_at)
    query = query.order_by(first_seen, RunRow.run_id)
    return list(session.exec(query.offset(offset).limit(limit)))


@router.get("/{search_id}/generations", response_model=list[GenerationRow])
def list_generations(search_id: str, session: SessionDep) -> list[GenerationRow]:
    search_or_404(session, search_id)
    return list(
        session.exec(
            select(GenerationRow)
            .where(GenerationRow.search_id == search_id)
            .order_by(col(GenerationRow.generation))
        )
    )


@router.get("/{search_id}/policies", response_model=list[PolicyRow])
def list_policies(search_id: str, session: SessionDep) -> list[PolicyRow]:
    search_or_404(session, search_id)
    return list(
        session.exec(
            select(PolicyRow)
            .where(PolicyRow.search_id == search_id)
            .order_by(col(PolicyRow.policy_version))
        )
    )


@router.get("/{search_id}/leaderboard", response_model=list[LeaderboardEntry])
def leaderboard(
    search_id: str, session: SessionDep, limit: Limit = 20, include_baseline: bool = True
) -> list[LeaderboardEntry]:
    """Ideas with a succeeded search-split run, best mean reward first (reward is higher is
    better whatever the metric's direction, so no direction is needed here)."""
    search_or_404(session, search_id)
    return [
        LeaderboardEntry(
            rank=e.rank,
            runs=e.standing.runs,
            mean_score=e.standing.mean_score,
            mean_reward=e.standing.mean_reward,
            best_score=e.standing.best_score,
            best_reward=e.standing.best_reward,
            best_run_id=e.standing.best_run_id,
            final_runs=e.final.runs if e.final else 0,
            final_mean_score=e.final.mean_score if e.final else None,
            **e.idea.model_dump(
                include={
                    "idea_id",
                    "title",
                    "mode",
                    "generation",
                    "proposer_kind",
                    "proposer_model",
                    "runs_succeeded",
                    "runs_completed",
                }
            ),
        )
        for e in ranking.leaderboard(session, search_id, include_baseline=include_baseline)[:limit]
    ]
