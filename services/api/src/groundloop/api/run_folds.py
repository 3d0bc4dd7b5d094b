"""How run events change the projections: RunRequested, RunStarted and RunCompleted.

Each fills its own column group of the run's row, then carries the run's change (open,
completed, succeeded, search-split result) over to its idea's counts; the ordering rules are in
groundloop.api.folds, which dispatches here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple

from groundloop import events as ev
from groundloop import ranking
from groundloop.api.fold_rules import assign, claims, dump, fill, idea_row, refresh_idea_status
from groundloop.api.rowset import Row, Rows
from groundloop.api.store import RunRow


class _RunMark(NamedTuple):
    """What one run contributes to its idea's folded columns: counts over every run, and
    (score, reward) when it is a succeeded search-split run (ranking.RunResult.counts), the
    only runs an idea's mean and best are of. (A tuple: made twice per run event.)"""

    idea_id: str | None = None
    open: bool = False
    completed: bool = False
    succeeded: bool = False
    result: tuple[float, float] | None = None

    @classmethod
    def of(cls, run: Row | None) -> _RunMark:
        if run is None:
            return _NO_RUN
        completed = run.completed_event_id is not None
        succeeded = completed and run.status == "succeeded"
        # Only a succeeded run can count (RunResult.counts): don't build one otherwise.
        counted = (
            succeeded and ranking.RunResult(run.idea_id, run.purpose, run.score, run.reward).counts
        )
        return cls(
            run.idea_id,
            run.started_event_id is not None and not completed,
            completed,
            succeeded,
            (run.score, run.reward) if counted else None,
        )


_NO_RUN = _RunMark()


def _fold_run(rows: Rows, e: ev.Event, change: Callable[[Row], None]) -> None:
    run = rows.get_or_create(RunRow, (e.run_id,), search_id=e.search_id)  # type: ignore[attr-defined]
    before = _RunMark.of(run)
    change(run)
    if run.completed_event_id is None:
        run.status = "running" if run.started_event_id is not None else "requested"
    after = _RunMark.of(run)
    if after != before:
        _carry_to_ideas(rows, run, before, after)


def _carry_to_ideas(rows: Rows, run: Row, before: _RunMark, after: _RunMark) -> None:
    """Move the run's contribution from its old mark to its new one: exact integer deltas for
    the counts; the idea's search-split results keyed by run id, from which mean and best are
    recomputed (in sorted order, so any arrival order stores the same numbers)."""
    touched: dict[str, Row] = {}
    for mark, sign in ((before, -1), (after, 1)):
        if mark.idea_id is None:
            continue
        idea = touched.get(mark.idea_id) or touched.setdefault(
            mark.idea_id, idea_row(rows, run.search_id, mark.idea_id, run.generation)
        )
        idea.runs_open += sign * mark.open
        idea.runs_completed += sign * mark.completed
        idea.runs_succeeded += sign * mark.succeeded
    for idea in touched.values():
        results = dict(idea.search_run_results or {})
        results.pop(run.run_id, None)
        if after.idea_id == idea.idea_id and after.result is not None:
            results[run.run_id] = list(after.result)
        if results != (idea.search_run_results or {}):
            _assign_standing(idea, results)
        refresh_idea_status(idea)


def _assign_standing(idea: Row, results: dict[str, list[float]]) -> None:
    best = ranking.standing(idea.idea_id, ((k, s, r) for k, (s, r) in results.items()))
    assign(
        idea,
        search_run_results=results,
        search_runs=best.runs if best else 0,
        mean_score=best and best.mean_score,
        mean_reward=best and best.mean_reward,
        best_run_id=best and best.best_run_id,
        best_reward=best and best.best_reward,
        best_score=best and best.best_score,
    )


def run_requested(rows: Rows, e: ev.RunRequested, at: datetime) -> None:
    def change(run: Row) -> None:
        if claims(at, e.event_id, run.requested_at, run.requested_event_id):
            assign(
                run, requested_at=at, requested_event_id=e.event_id, resource_class=e.resource_class
            )
        fill(
            run,
            idea_id=e.idea_id,
            patch_id=e.patch_id,
            generation=e.generation,
            purpose=e.purpose,
            seed=e.seed,
        )

    _fold_run(rows, e, change)


def run_started(rows: Rows, e: ev.RunStarted, at: datetime) -> None:
    def change(run: Row) -> None:
        held = (run.attempt, run.started_at, run.started_event_id)
        if run.started_event_id is None or (e.attempt, at, e.event_id) > held:
            assign(
                run,
                started_at=at,
                started_event_id=e.event_id,
                attempt=e.attempt,
                runner_id=e.runner_id,
                host=e.host,
                devices=list(e.devices),
            )
        fill(run, idea_id=e.idea_id, patch_id=e.patch_id, seed=e.seed)

    _fold_run(rows, e, change)


def run_completed(rows: Rows, e: ev.RunCompleted, at: datetime) -> None:
    def change(run: Row) -> None:
        mine = (e.status != "succeeded", at, e.event_id)
        held = (run.status != "succeeded", run.completed_at, run.completed_event_id)
        if run.completed_event_id is None or mine < held:
            assign(
                run,
                completed_at=at,
                completed_event_id=e.event_id,
                status=e.status,
                score=e.score,
                reward=e.reward,
                metrics=dict(e.metrics),
                wall_seconds=e.wall_seconds,
                gpu_seconds=e.gpu_seconds,
                log_key=e.log_key,
                error_tail=e.error_tail,
                reason=e.reason,
                provenance=dump(e.provenance),
            )
        fill(
            run,
            idea_id=e.idea_id,
            patch_id=e.patch_id,
            generation=e.generation,
            purpose=e.purpose,
            seed=e.seed,
        )

    _fold_run(rows, e, change)
