"""JSON the dashboard's pages read beyond the plain resources: a summary line per search, a
search's runs and best-so-far curve with its baseline band and final re-evaluation, and its
cost and tokens per generation. Every number is computed from the projections with the same
functions the report and the leaderboard use (groundloop.api.ranking, groundloop.api.usage).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from sqlalchemy import func
from sqlmodel import SQLModel, col, select

from groundloop import ranking as shared_ranking
from groundloop.api import ranking
from groundloop.api.deps import Limit, SessionDep, search_or_404
from groundloop.api.store import IdeaRow, PatchRow, RunRow, SearchRow
from groundloop.api.usage import model_usage
from groundloop.manifest import ManifestError, load_manifest
from groundloop.settings import Settings

router = APIRouter(
    tags=["dashboard"], responses={404: {"description": "not found in the projections"}}
)

OPEN_RUN_STATUSES = ("requested", "running")


class SearchSummary(SQLModel):
    """One line of the searches page."""

    search_id: str
    status: str
    environment: str | None
    strategy: str | None
    proposer_kind: str | None
    proposer_model: str | None
    seed: int | None
    started_at: datetime | None
    completed_at: datetime | None
    completion_reason: str | None
    generation: int | None  # the highest generation opened
    generations: int | None  # planned
    ideas: int
    runs_succeeded: int
    runs_failed: int  # failed, timed out, killed or rejected
    runs_open: int  # requested or running
    best_idea_id: str | None  # the leader on the search split (groundloop.ranking)
    best_title: str | None
    best_score: float | None  # the leader's mean search-split score
    baseline_score: float | None  # mean of the baseline's search-split runs
    final_best_score: float | None  # SearchCompleted: best on the final split
    cost_usd: float
    gpu_seconds: float


@router.get("/dashboard/searches", response_model=list[SearchSummary])
def search_summaries(session: SessionDep, limit: Limit = 200) -> list[SearchSummary]:
    """Every search, newest first, with its counts, leader, cost and GPU time."""
    searches = session.exec(
        select(SearchRow)
        .order_by(col(SearchRow.started_at).is_(None), col(SearchRow.started_at).desc())
        .limit(limit)
    ).all()
    ids = [s.search_id for s in searches]
    runs: dict[str, list[RunRow]] = defaultdict(list)
    for run in session.exec(select(RunRow).where(col(RunRow.search_id).in_(ids))):
        runs[run.search_id].append(run)
    idea_counts = dict(
        session.exec(
            select(IdeaRow.search_id, func.count())
            .where(col(IdeaRow.search_id).in_(ids), IdeaRow.mode != "baseline")
            .group_by(IdeaRow.search_id)
        ).all()
    )
    out = []
    for search in searches:
        mine = runs[search.search_id]
        statuses = Counter(r.status for r in mine)
        board = ranking.leaderboard(session, search.search_id, include_baseline=False)
        leader = board[0] if board else None
        baseline = ranking.baseline_scores(mine)
        out.append(
            SearchSummary(
                search_id=search.search_id,
                status=search.status,
                environment=search.environment,
                strategy=search.strategy,
                proposer_kind=(search.proposer or {}).get("kind"),
                proposer_model=(search.proposer or {}).get("model"),
                seed=search.seed,
                started_at=search.started_at,
                completed_at=search.completed_at,
                completion_reason=search.completion_reason,
                generation=search.current_generation,
                generations=(search.config or {}).get("generations"),
                ideas=idea_counts.get(search.search_id, 0),
                runs_succeeded=statuses["succeeded"],
                runs_failed=sum(
                    n for s, n in statuses.items() if s not in ("succeeded", *OPEN_RUN_STATUSES)
                ),
                runs_open=sum(statuses[s] for s in OPEN_RUN_STATUSES),
                best_idea_id=leader.idea.idea_id if leader else None,
                best_title=leader.idea.title if leader else None,
                best_score=leader.standing.mean_score if leader else None,
                baseline_score=shared_ranking.mean(baseline) if baseline else None,
                final_best_score=search.best_score,
                cost_usd=model_usage(session, search.search_id).cost_usd,
                gpu_seconds=sum(r.gpu_seconds or 0.0 for r in mine),
            )
        )
    return out


class MetricInfo(SQLModel):
    name: str | None
    direction: Literal["minimize", "maximize"] | None
    split: str | None = None
    final_split: str | None = None
    # "manifest": read from the environment on this machine; "inferred": from how the runs'
    # rewards order their scores (the environment is not here); None: too few runs to tell
    source: Literal["manifest", "inferred"] | None = None


class RunPoint(SQLModel):
    """One completed run on the curve's x axis (its position in completion order)."""

    position: int
    run_id: str
    idea_id: str | None
    title: str | None
    mode: str | None  # the idea's: baseline / fresh / explore / exploit / rl
    purpose: str | None  # search / baseline / reeval
    status: str
    generation: int | None
    score: float | None
    reward: float | None
    completed_at: datetime | None


class CurveStep(SQLModel):
    """The leader after the run at `position` completed: its mean over `runs` runs."""

    position: int
    run_id: str
    idea_id: str
    title: str | None
    mean_score: float
    runs: int
    completed_at: datetime | None


class SearchCurve(SQLModel):
    search_id: str
    metric: MetricInfo
    runs: list[RunPoint]  # every completed run (final re-evaluation included), in order
    best_so_far: list[CurveStep]  # search split only (groundloop.ranking.best_so_far)
    baseline_scores: list[float]  # the unpatched baseline's search-split runs
    final: list[dict[str, Any]]  # SearchCompleted.final: mean, CI, p per re-evaluated idea
    final_baseline_score: float | None


def metric_info(settings: Settings, search: SearchRow, runs: list[RunRow]) -> MetricInfo:
    if search.environment:
        try:
            metric = load_manifest(settings.environments_dir / search.environment).metric
            return MetricInfo(
                name=metric.name,
                direction=metric.direction,
                split=metric.split,
                final_split=metric.final_split or metric.split,
                source="manifest",
            )
        except (ManifestError, OSError, ValueError):
            pass  # not on this machine (a remote store): infer the direction below
    scored = sorted(
        {(r.reward, r.score) for r in runs if r.reward is not None and r.score is not None}
    )
    if len(scored) >= 2 and scored[0][0] != scored[-1][0] and scored[0][1] != scored[-1][1]:
        rising = scored[-1][1] > scored[0][1]  # higher reward came with a higher score
        return MetricInfo(
            name=None, direction="maximize" if rising else "minimize", source="inferred"
        )
    return MetricInfo(name=None, direction=None)


@router.get("/searches/{search_id}/curve", response_model=SearchCurve)
def search_curve(search_id: str, request: Request, session: SessionDep) -> SearchCurve:
    """Every completed run as a point (by completion order), the best-so-far curve on the
    search split, the baseline's runs (the band) and the final re-evaluation with its CI."""
    search = search_or_404(session, search_id)
    runs = ranking.search_runs(session, search_id)
    ideas = {
        i.idea_id: i for i in session.exec(select(IdeaRow).where(IdeaRow.search_id == search_id))
    }
    done = sorted(
        (r for r in runs if r.completed_at is not None), key=lambda r: (r.completed_at, r.run_id)
    )
    position = {r.run_id: n for n, r in enumerate(done, start=1)}
    points = [
        RunPoint(
            position=position[r.run_id],
            run_id=r.run_id,
            idea_id=r.idea_id,
            title=ideas[r.idea_id].title if r.idea_id in ideas else None,
            mode=ideas[r.idea_id].mode if r.idea_id in ideas else "baseline",
            purpose=r.purpose,
            status=r.status,
            generation=r.generation,
            score=r.score,
            reward=r.reward,
            completed_at=r.completed_at,
        )
        for r in done
    ]
    steps = [
        CurveStep(
            position=position[p.run_id],
            run_id=p.run_id,
            idea_id=p.idea_id,
            title=ideas[p.idea_id].title if p.idea_id in ideas else None,
            mean_score=p.mean_score,
            runs=p.runs,
            completed_at=p.completed_at,
        )
        for p in ranking.best_so_far(runs)
        if p.run_id in position
    ]
    baseline = ranking.baseline_scores(runs)
    if not baseline:  # older logs: the baseline's runs carry the baseline idea's id
        baseline = [
            p.score
            for p in points
            if p.purpose == "baseline" and p.status == "succeeded" and p.score is not None
        ]
    return SearchCurve(
        search_id=search_id,
        metric=metric_info(request.app.state.settings, search, runs),
        runs=points,
        best_so_far=steps,
        baseline_scores=baseline,
        final=[
            {**f, "title": ideas[f["idea_id"]].title if f.get("idea_id") in ideas else None}
            for f in (search.final or [])
        ],
        final_baseline_score=search.baseline_score,
    )


class GenerationCost(SQLModel):
    generation: int | None
    ideas: int
    ideator_input_tokens: int
    ideator_output_tokens: int
    ideator_usd: float
    implementer_input_tokens: int
    implementer_output_tokens: int
    implementer_usd: float  # patches, and implementations that failed
    runs: int
    gpu_seconds: float
    wall_seconds: float


class SearchCosts(SQLModel):
    search_id: str
    generations: list[GenerationCost]
    cost_usd: float  # equals GET /searches/{id} cost_usd
    input_tokens: int
    output_tokens: int
    gpu_seconds: float


@router.get("/searches/{search_id}/costs", response_model=SearchCosts)
def search_costs(search_id: str, session: SessionDep) -> SearchCosts:
    """Model tokens and dollars (ideator, implementer) and run time, per generation."""
    search_or_404(session, search_id)
    rows: dict[int | None, GenerationCost] = {}

    def row(generation: int | None) -> GenerationCost:
        return rows.setdefault(
            generation,
            GenerationCost(
                generation=generation,
                ideas=0,
                ideator_input_tokens=0,
                ideator_output_tokens=0,
                ideator_usd=0.0,
                implementer_input_tokens=0,
                implementer_output_tokens=0,
                implementer_usd=0.0,
                runs=0,
                gpu_seconds=0.0,
                wall_seconds=0.0,
            ),
        )

    for idea in session.exec(select(IdeaRow).where(IdeaRow.search_id == search_id)):
        r = row(idea.generation)
        r.ideas += idea.mode != "baseline"
        r.ideator_input_tokens += idea.input_tokens
        r.ideator_output_tokens += idea.output_tokens
        r.ideator_usd += idea.cost_usd
        r.implementer_usd += idea.patch_failed_cost_usd
    for patch in session.exec(select(PatchRow).where(PatchRow.search_id == search_id)):
        r = row(patch.generation)
        r.implementer_input_tokens += patch.input_tokens
        r.implementer_output_tokens += patch.output_tokens
        r.implementer_usd += patch.cost_usd
    for run in ranking.search_runs(session, search_id):
        r = row(run.generation)
        r.runs += 1
        r.gpu_seconds += run.gpu_seconds or 0.0
        r.wall_seconds += run.wall_seconds or 0.0
    usage = model_usage(session, search_id)
    ordered = sorted(rows.values(), key=lambda g: (g.generation is None, g.generation or 0))
    return SearchCosts(
        search_id=search_id,
        generations=ordered,
        cost_usd=usage.cost_usd,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        gpu_seconds=sum(g.gpu_seconds for g in ordered),
    )
