"""groundloop.ranking over the projection tables: the leaderboard the API, the report and
`groundloop search`'s progress line all show.

Ranks from the runs table (not the ideas' folded columns) so a number on any surface is the
same function of the same runs: the mean of each idea's succeeded search-split runs, with its
count; final re-evaluation runs are summarised separately (`final_results`) and never ranked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, func, or_
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from groundloop import ranking
from groundloop.api.store import IdeaRow, RunRow
from groundloop.ranking import Standing


def run_result(run: RunRow) -> ranking.RunResult:
    return ranking.RunResult(
        idea_id=run.idea_id,
        purpose=run.purpose,
        score=run.score,
        reward=run.reward,
        completed_at=run.completed_at,
        run_id=run.run_id,
        succeeded=run.completed_at is not None and run.status == "succeeded",
    )


def search_runs(session: Session, search_id: str) -> list[RunRow]:
    return list(session.exec(select(RunRow).where(RunRow.search_id == search_id)))


@dataclass(frozen=True)
class FinalResult:
    """An idea's final re-evaluation (purpose "reeval", on the final split): its own numbers."""

    idea_id: str
    runs: int
    mean_score: float
    scores: list[float]


@dataclass(frozen=True)
class Entry:
    """One leaderboard line: the idea, its search-split standing, and its final result if any."""

    rank: int
    idea: IdeaRow
    standing: Standing
    final: FinalResult | None


def final_results(runs: Iterable[RunRow]) -> dict[str, FinalResult]:
    """Per idea, the scores of its succeeded final re-evaluation runs (by run id)."""
    scores: dict[str, list[tuple[str, float]]] = {}
    for run in runs:
        if (
            run.purpose == ranking.FINAL_PURPOSE
            and run.status == "succeeded"
            and run.idea_id is not None
            and run.score is not None
        ):
            scores.setdefault(run.idea_id, []).append((run.run_id, run.score))
    return {
        idea_id: FinalResult(
            idea_id, len(values), ranking.mean(s for _, s in values), [s for _, s in sorted(values)]
        )
        for idea_id, values in scores.items()
    }


def leaderboard(session: Session, search_id: str, *, include_baseline: bool = True) -> list[Entry]:
    """Ideas with a search-split result, best mean reward first (groundloop.ranking)."""
    runs = search_runs(session, search_id)
    ideas = {
        i.idea_id: i for i in session.exec(select(IdeaRow).where(IdeaRow.search_id == search_id))
    }
    finals = final_results(runs)
    order = [
        s
        for s in ranking.ranked(run_result(r) for r in runs)
        if s.idea_id in ideas and (include_baseline or ideas[s.idea_id].mode != "baseline")
    ]
    return [
        Entry(rank, ideas[s.idea_id], s, finals.get(s.idea_id))
        for rank, s in enumerate(order, start=1)
    ]


def unranked(session: Session, search_id: str, ranked: Sequence[Entry]) -> list[IdeaRow]:
    """The search's ideas without a search-split result, in proposal order."""
    seen = {e.idea.idea_id for e in ranked}
    ideas = session.exec(select(IdeaRow).where(IdeaRow.search_id == search_id)).all()
    return sorted(
        (i for i in ideas if i.idea_id not in seen),
        key=lambda i: (i.generation or 0, i.idea_id),
    )


def baseline_scores(runs: Iterable[RunRow]) -> list[float]:
    """The unpatched baseline's search-split scores, in completion order."""
    return ranking.baseline(run_result(r) for r in runs)


def best_so_far(runs: Iterable[RunRow]) -> list[ranking.CurvePoint]:
    """The best-so-far curve by completion order, search-split runs only (groundloop.ranking)."""
    return ranking.best_so_far(run_result(r) for r in runs)


def search_baseline_scores(session: Session, search_id: str) -> list[float]:
    """`baseline_scores` of the search's runs, reading only the baseline's own runs."""
    rows = session.exec(
        select(RunRow.completed_at, RunRow.run_id, RunRow.score, RunRow.reward).where(
            RunRow.search_id == search_id,
            RunRow.purpose == "baseline",
            RunRow.status == "succeeded",
            col(RunRow.idea_id).is_(None),
        )
    )
    return ranking.baseline(
        ranking.RunResult(None, "baseline", score, reward, completed_at, run_id)
        for completed_at, run_id, score, reward in rows
        if completed_at is not None  # `run_result`'s `succeeded` needs completion too
    )


# A database mean (AVG) sums in its own order, so it may differ from ranking.mean (fsum of the
# sorted values) in the last bits: by at most ~count x epsilon x the largest |value|. Ideas
# within this much of the best are all re-ranked exactly; the factor leaves a wide margin.
_AVG_SLACK = 2.0**-40


def leader(session: Session, search_id: str, *, include_baseline: bool = True) -> Entry | None:
    """`leaderboard(...)[0]` (None when the board is empty) without loading every run: the
    database averages each idea's counted runs, and only the ideas whose average could be
    the best are ranked by groundloop.ranking from their runs."""
    counted = _counted_search_runs(search_id)
    ideas_of_search = [
        col(IdeaRow.idea_id) == col(RunRow.idea_id),
        col(IdeaRow.search_id) == search_id,
    ]
    if not include_baseline:
        ideas_of_search.append(or_(col(IdeaRow.mode).is_(None), col(IdeaRow.mode) != "baseline"))
    averages = session.exec(
        select(
            RunRow.idea_id,
            func.avg(RunRow.reward),
            func.count(),
            func.max(func.abs(RunRow.reward)),
        )
        .join(IdeaRow, and_(*ideas_of_search))
        .where(*counted)
        .group_by(RunRow.idea_id)
    ).all()
    if not averages:
        return None
    slack = {idea_id: runs * largest * _AVG_SLACK for idea_id, _, runs, largest in averages}
    if all(math.isfinite(avg) and math.isfinite(slack[i]) for i, avg, _, _ in averages):
        floor = max(avg - slack[idea_id] for idea_id, avg, _, _ in averages)
        contenders = [i for i, avg, _, _ in averages if avg + slack[i] >= floor]
    else:  # an infinite reward: no bound holds, rank every idea exactly
        contenders = [idea_id for idea_id, _, _, _ in averages]
    results: dict[str, list[tuple[str, float, float]]] = {}
    for idea_id, run_id, score, reward in session.exec(
        select(RunRow.idea_id, RunRow.run_id, RunRow.score, RunRow.reward).where(
            *counted, col(RunRow.idea_id).in_(contenders)
        )
    ):
        results.setdefault(idea_id, []).append((run_id, score, reward))  # type: ignore[arg-type]
    found = (ranking.standing(idea_id, rows) for idea_id, rows in results.items())
    best = min((s for s in found if s is not None), key=ranking.rank_key, default=None)
    # The queries are not one snapshot: only a concurrent delete (a rebuild swap) that
    # removed what the averages saw makes these None.
    idea = session.get(IdeaRow, best.idea_id) if best is not None else None
    if best is None or idea is None:
        return None
    finals = session.exec(
        select(RunRow).where(
            RunRow.search_id == search_id,
            RunRow.idea_id == best.idea_id,
            RunRow.purpose == ranking.FINAL_PURPOSE,
        )
    )
    return Entry(1, idea, best, final_results(finals).get(best.idea_id))


def _counted_search_runs(search_id: str) -> list[ColumnElement[bool]]:
    """SQL for `RunResult.counts` of an idea's run (`run_result`), for this search's runs."""
    return [
        col(RunRow.search_id) == search_id,
        col(RunRow.idea_id).is_not(None),
        col(RunRow.completed_at).is_not(None),
        col(RunRow.status) == "succeeded",
        col(RunRow.purpose).in_(sorted(ranking.SEARCH_PURPOSES)),
        col(RunRow.score).is_not(None),
        col(RunRow.reward).is_not(None),
    ]
