"""groundloop.ranking over the projection tables: the leaderboard the API, the report and
`groundloop search`'s progress line all show.

Ranks from the runs table (not the ideas' folded columns) so a number on any surface is the
same function of the same runs: the mean of each idea's succeeded search-split runs, with its
count; final re-evaluation runs are summarised separately (`final_results`) and never ranked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlmodel import Session, select

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
