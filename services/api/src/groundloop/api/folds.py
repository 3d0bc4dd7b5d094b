"""How each event changes the projections: one fold function per event type.

Used by groundloop.api.projector, which adds the transaction and the tracking record.

Order. Each subject is delivered in order, but a redelivery can bring, say, a RunCompleted
before its RunStarted. Distinct events reach the same final tables in any arrival order:
- each event writes only its own group of columns (RunStarted: runner, host, started_at…);
  a row another event normally creates is created as a stub when needed (an idea first seen
  in its PatchReady) and filled in when that event arrives;
- derived columns (statuses; an idea's run counts and best run) are recomputed from those
  groups, never counted per event;
- when two distinct events claim the same group (a re-run handler that minted a new id), a
  fixed rule picks the winner: the earliest (occurred_at, event_id); for RunStarted the
  highest attempt (the live one); for RunCompleted a success over a failure, then the earliest.
Assumed: events about one entity agree on its identity fields (search, idea, patch,
generation, seed, purpose); a field no authoritative event has set yet is filled by whichever
event brings it first (IdeaProposed is authoritative for an idea's generation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from groundloop import events as ev
from groundloop.api.rowset import Row, Rows
from groundloop.api.store import GenerationRow, IdeaRow, PatchRow, PolicyRow, RunRow, SearchRow, as_utc


def _claims(at: datetime, event_id: str, held_at: datetime | None, held_by: str | None) -> bool:
    """Does this event win a column group over the event that holds it (earliest wins)?"""
    return held_by is None or (at, event_id) < (held_at, held_by)


def _fill(row: Any, **fields: Any) -> None:
    """Identity fields: set those still unknown, never overwrite."""
    for name, value in fields.items():
        if value is not None and getattr(row, name) is None:
            setattr(row, name, value)


def _update(row: Any, **fields: Any) -> None:
    for name, value in fields.items():
        setattr(row, name, value)


def _dump(model: ev.Record | None) -> Any:
    return None if model is None else model.model_dump(mode="json")


# ---------------------------------------------------------------------------- searches


def _search_started(rows: Rows, e: ev.SearchStarted, at: datetime) -> None:
    s = rows.get_or_create(SearchRow, (e.search_id,))
    if _claims(at, e.event_id, s.started_at, s.started_event_id):
        _update(
            s,
            started_at=at,
            started_event_id=e.event_id,
            environment=e.environment,
            environment_digest=e.environment_digest,
            strategy=e.strategy,
            seed=e.seed,
            config=_dump(e.config),
            proposer=_dump(e.proposer),
            implementer=_dump(e.implementer),
            forked_from=e.forked_from,
            forked_generation=e.forked_generation,
        )


def _search_completed(rows: Rows, e: ev.SearchCompleted, at: datetime) -> None:
    s = rows.get_or_create(SearchRow, (e.search_id,))
    if _claims(at, e.event_id, s.completed_at, s.completed_event_id):
        _update(
            s,
            completed_at=at,
            completed_event_id=e.event_id,
            completion_reason=e.reason,
            best_idea_id=e.best_idea_id,
            best_score=e.best_score,
            baseline_score=e.baseline_score,
            totals=_dump(e.totals),
            final=[_dump(f) for f in e.final],
        )
    s.status = "completed"


def _generation_advanced(rows: Rows, e: ev.GenerationAdvanced, at: datetime) -> None:
    g = rows.get_or_create(GenerationRow, (e.search_id, e.generation))
    if _claims(at, e.event_id, g.opened_at, g.opened_event_id):
        best = e.best_so_far
        _update(
            g,
            opened_at=at,
            opened_event_id=e.event_id,
            fresh=e.plan.fresh,
            explore=e.plan.explore,
            exploit=e.plan.exploit,
            plan=_dump(e.plan),
            best_so_far_idea_id=best and best.idea_id,
            best_so_far_score=best and best.score,
        )
    if e.previous is not None:
        p = rows.get_or_create(GenerationRow, (e.search_id, e.previous.generation))
        if _claims(at, e.event_id, p.closed_at, p.closed_event_id):
            summary = e.previous
            _update(
                p,
                closed_at=at,
                closed_event_id=e.event_id,
                ideas=summary.ideas,
                patched=summary.patched,
                succeeded=summary.succeeded,
                best_score=summary.best_score,
                mean_score=summary.mean_score,
            )
    s = rows.get_or_create(SearchRow, (e.search_id,))
    s.current_generation = max(e.generation, s.current_generation or 0)


def _policy_updated(rows: Rows, e: ev.PolicyUpdated, at: datetime) -> None:
    fields = dict(
        event_id=e.event_id,
        updated_at=at,
        step=e.step,
        checkpoint_key=e.checkpoint_key,
        mean_reward=e.mean_reward,
        max_reward=e.max_reward,
        diversity=e.diversity,
        kl=e.kl,
    )
    key = (e.search_id, e.policy_version)
    row = rows.get(PolicyRow, key)
    if row is None:
        rows.get_or_create(PolicyRow, key, **fields)
    elif _claims(at, e.event_id, row.updated_at, row.event_id):
        _update(row, **fields)


# ---------------------------------------------------------------------------- ideas, patches


def _idea(rows: Rows, search_id: str, idea_id: str, generation: int | None) -> Row:
    idea = rows.get_or_create(IdeaRow, (idea_id,), search_id=search_id)
    _fill(idea, generation=generation)
    return idea


def _refresh_idea_status(idea: Row) -> None:
    idea.status = _idea_status(idea)


def _idea_status(idea: Row) -> str:
    """The furthest stage the idea reached: a succeeded run outranks everything else."""
    if idea.runs_succeeded:
        return "ran"
    if idea.runs_open:
        return "running"
    if idea.runs_completed:
        return "run_failed"
    if idea.patch_id is not None:
        return "patched"
    if idea.patch_failed_event_id is not None:
        return "patch_failed"
    return "proposed"


def _idea_proposed(rows: Rows, e: ev.IdeaProposed, at: datetime) -> None:
    idea = _idea(rows, e.search_id, e.idea_id, e.generation)
    if _claims(at, e.event_id, idea.proposed_at, idea.proposed_event_id):
        _update(
            idea,
            proposed_at=at,
            proposed_event_id=e.event_id,
            generation=e.generation,
            mode=e.mode,
            title=e.title,
            text=e.text,
            proposer_kind=e.proposer.kind,
            proposer_model=e.proposer.model,
            policy_version=e.proposer.policy_version,
            parent_ids=list(e.parent_ids),
            prompt_digest=e.prompt_digest,
            knobs=None if e.knobs is None else dict(e.knobs),
            input_tokens=e.usage.input_tokens,
            output_tokens=e.usage.output_tokens,
            cost_usd=e.usage.cost_usd,
        )
    _refresh_idea_status(idea)


def _patch_ready(rows: Rows, e: ev.PatchReady, at: datetime) -> None:
    fields = dict(
        search_id=e.search_id,
        idea_id=e.idea_id,
        event_id=e.event_id,
        created_at=at,
        generation=e.generation,
        environment=e.environment,
        environment_digest=e.environment_digest,
        resource_class=e.resource_class,
        diff=e.diff,
        diff_key=e.diff_key,
        diff_digest=e.diff_digest,
        patched_digest=e.patched_digest,
        files_changed=list(e.files_changed),
        attempts=e.attempts,
        implementer_kind=e.implementer.kind,
        implementer_model=e.implementer.model,
        input_tokens=e.usage.input_tokens,
        output_tokens=e.usage.output_tokens,
        cost_usd=e.usage.cost_usd,
        preflight_passed=e.preflight.passed,
        preflight=_dump(e.preflight),
        seed=e.seed,
    )
    patch = rows.get(PatchRow, (e.patch_id,))
    if patch is None:
        rows.get_or_create(PatchRow, (e.patch_id,), **fields)
    elif _claims(at, e.event_id, patch.created_at, patch.event_id):
        _update(patch, **fields)
    idea = _idea(rows, e.search_id, e.idea_id, e.generation)
    if _claims(at, e.event_id, idea.patched_at, idea.patch_event_id):
        _update(idea, patch_id=e.patch_id, patched_at=at, patch_event_id=e.event_id)
    _refresh_idea_status(idea)


def _patch_failed(rows: Rows, e: ev.PatchFailed, at: datetime) -> None:
    idea = _idea(rows, e.search_id, e.idea_id, e.generation)
    if _claims(at, e.event_id, idea.patch_failed_at, idea.patch_failed_event_id):
        _update(
            idea,
            patch_failed_at=at,
            patch_failed_event_id=e.event_id,
            patch_stage=e.stage,
            patch_error=e.last_error,
            patch_attempts=e.attempts,
            patch_failed_cost_usd=e.usage.cost_usd,
        )
    _refresh_idea_status(idea)


# ---------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class _RunMark:
    """What one run contributes to its idea's folded columns."""

    idea_id: str | None = None
    open: bool = False
    completed: bool = False
    succeeded: bool = False
    reward: float | None = None

    @classmethod
    def of(cls, run: Row | None) -> _RunMark:
        if run is None:
            return cls()
        completed = run.completed_event_id is not None
        return cls(
            run.idea_id,
            run.started_event_id is not None and not completed,
            completed,
            completed and run.status == "succeeded",
            run.reward,
        )


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
    """Move the run's contribution from its old mark to its new one (exact integer deltas;
    the best run is recomputed from the table in the rare case it got worse)."""
    touched: dict[str, Row] = {}
    for mark, sign in ((before, -1), (after, 1)):
        if mark.idea_id is None:
            continue
        idea = touched.setdefault(
            mark.idea_id, _idea(rows, run.search_id, mark.idea_id, run.generation)
        )
        idea.runs_open += sign * mark.open
        idea.runs_completed += sign * mark.completed
        idea.runs_succeeded += sign * mark.succeeded
    for idea in touched.values():
        if idea.best_run_id == run.run_id:
            _recompute_best(rows, idea)
        elif after.idea_id == idea.idea_id and after.succeeded and _beats(run, idea):
            _update(idea, best_run_id=run.run_id, best_reward=run.reward, best_score=run.score)
        _refresh_idea_status(idea)


def _beats(run: Row, idea: Row) -> bool:
    """Higher reward wins; equal rewards go to the smaller run id (order-independent)."""
    if idea.best_run_id is None:
        return True
    return (run.reward, idea.best_run_id) > (idea.best_reward, run.run_id)


def _recompute_best(rows: Rows, idea: Row) -> None:
    rows.flush()
    runs = RunRow.__table__.c  # type: ignore[attr-defined]
    best = rows.conn.execute(
        select(runs.run_id, runs.reward, runs.score)
        .where(
            runs.idea_id == idea.idea_id,
            runs.status == "succeeded",
            runs.completed_event_id.is_not(None),
        )
        .order_by(runs.reward.desc(), runs.run_id)
        .limit(1)
    ).first()
    _update(
        idea,
        best_run_id=best and best.run_id,
        best_reward=best and best.reward,
        best_score=best and best.score,
    )


def _run_requested(rows: Rows, e: ev.RunRequested, at: datetime) -> None:
    def change(run: Row) -> None:
        if _claims(at, e.event_id, run.requested_at, run.requested_event_id):
            _update(
                run, requested_at=at, requested_event_id=e.event_id, resource_class=e.resource_class
            )
        _fill(
            run,
            idea_id=e.idea_id,
            patch_id=e.patch_id,
            generation=e.generation,
            purpose=e.purpose,
            seed=e.seed,
        )

    _fold_run(rows, e, change)


def _run_started(rows: Rows, e: ev.RunStarted, at: datetime) -> None:
    def change(run: Row) -> None:
        held = (run.attempt, run.started_at, run.started_event_id)
        if run.started_event_id is None or (e.attempt, at, e.event_id) > held:
            _update(
                run,
                started_at=at,
                started_event_id=e.event_id,
                attempt=e.attempt,
                runner_id=e.runner_id,
                host=e.host,
                devices=list(e.devices),
            )
        _fill(run, idea_id=e.idea_id, patch_id=e.patch_id, seed=e.seed)

    _fold_run(rows, e, change)


def _run_completed(rows: Rows, e: ev.RunCompleted, at: datetime) -> None:
    def change(run: Row) -> None:
        mine = (e.status != "succeeded", at, e.event_id)
        held = (run.status != "succeeded", run.completed_at, run.completed_event_id)
        if run.completed_event_id is None or mine < held:
            _update(
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
                provenance=_dump(e.provenance),
            )
        _fill(
            run,
            idea_id=e.idea_id,
            patch_id=e.patch_id,
            generation=e.generation,
            purpose=e.purpose,
            seed=e.seed,
        )

    _fold_run(rows, e, change)


FOLDS: dict[type[ev.Event], Callable[[Rows, Any, datetime], None]] = {
    ev.SearchStarted: _search_started,
    ev.GenerationAdvanced: _generation_advanced,
    ev.IdeaProposed: _idea_proposed,
    ev.PatchReady: _patch_ready,
    ev.PatchFailed: _patch_failed,
    ev.RunRequested: _run_requested,
    ev.RunStarted: _run_started,
    ev.RunCompleted: _run_completed,
    ev.SearchCompleted: _search_completed,
    ev.PolicyUpdated: _policy_updated,
}


def fold(rows: Rows, event: ev.Event) -> None:
    """Fold one event into the projections (no transaction handling, no tracking record)."""
    FOLDS[type(event)](rows, event, as_utc(event.occurred_at))
