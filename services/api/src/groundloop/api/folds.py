"""How each event changes the projections: one fold function per event type.

Used by groundloop.api.projector, which adds the transaction and the tracking record. The
rules below are in groundloop.api.fold_rules; the run events fold in groundloop.api.run_folds.

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
from datetime import datetime
from typing import Any

from groundloop import events as ev
from groundloop.api.fold_rules import assign, claims, dump, idea_row, refresh_idea_status
from groundloop.api.rowset import Rows
from groundloop.api.run_folds import run_completed, run_requested, run_started
from groundloop.api.store import GenerationRow, PatchRow, PolicyRow, SearchRow, as_utc

# ---------------------------------------------------------------------------- searches


def _search_started(rows: Rows, e: ev.SearchStarted, at: datetime) -> None:
    s = rows.get_or_create(SearchRow, (e.search_id,))
    if claims(at, e.event_id, s.started_at, s.started_event_id):
        assign(
            s,
            started_at=at,
            started_event_id=e.event_id,
            environment=e.environment,
            environment_digest=e.environment_digest,
            strategy=e.strategy,
            seed=e.seed,
            config=dump(e.config),
            proposer=dump(e.proposer),
            implementer=dump(e.implementer),
            forked_from=e.forked_from,
            forked_generation=e.forked_generation,
        )


def _search_completed(rows: Rows, e: ev.SearchCompleted, at: datetime) -> None:
    s = rows.get_or_create(SearchRow, (e.search_id,))
    if claims(at, e.event_id, s.completed_at, s.completed_event_id):
        assign(
            s,
            completed_at=at,
            completed_event_id=e.event_id,
            completion_reason=e.reason,
            best_idea_id=e.best_idea_id,
            best_score=e.best_score,
            baseline_score=e.baseline_score,
            totals=dump(e.totals),
            final=[dump(f) for f in e.final],
        )
    s.status = "completed"


def _search_stopped(rows: Rows, e: ev.SearchStopped, at: datetime) -> None:
    """A stopped search ends without SearchCompleted: status "stopped", the reason in
    completion_reason (its stage and error type lead it). A SearchCompleted outranks it in
    any arrival order (the evolver emits none after a stop, so both is a fork's edge case)."""
    s = rows.get_or_create(SearchRow, (e.search_id,))
    if s.status == "completed":
        return
    if claims(at, e.event_id, s.completed_at, s.completed_event_id):
        kind = f", {e.error_type}" if e.error_type else ""
        assign(
            s,
            completed_at=at,
            completed_event_id=e.event_id,
            completion_reason=f"stopped by the {e.stage}{kind}: {e.reason}",
        )
    s.status = "stopped"


def _ideas_shortfall(rows: Rows, e: ev.IdeasShortfall, at: datetime) -> None:
    """Nothing to project: the generation's ideas are counted from their own rows."""


def _generation_advanced(rows: Rows, e: ev.GenerationAdvanced, at: datetime) -> None:
    g = rows.get_or_create(GenerationRow, (e.search_id, e.generation))
    if claims(at, e.event_id, g.opened_at, g.opened_event_id):
        best = e.best_so_far
        assign(
            g,
            opened_at=at,
            opened_event_id=e.event_id,
            fresh=e.plan.fresh,
            explore=e.plan.explore,
            exploit=e.plan.exploit,
            plan=dump(e.plan),
            best_so_far_idea_id=best and best.idea_id,
            best_so_far_score=best and best.score,
        )
    if e.previous is not None:
        p = rows.get_or_create(GenerationRow, (e.search_id, e.previous.generation))
        if claims(at, e.event_id, p.closed_at, p.closed_event_id):
            summary = e.previous
            assign(
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
        generation=e.generation,
        checkpoint_digest=e.checkpoint_digest,
        loss=e.loss,
        group_size=e.group_size,
        shaped_mean_reward=e.shaped_mean_reward,
        distinct_fraction=e.distinct_fraction,
        mean_similarity=e.mean_similarity,
        valid_fraction=e.valid_fraction,
        mean_completion_tokens=e.mean_completion_tokens,
        collapsed=e.collapsed,
    )
    key = (e.search_id, e.policy_version)
    row = rows.get(PolicyRow, key)
    if row is None:
        rows.get_or_create(PolicyRow, key, **fields)
    elif claims(at, e.event_id, row.updated_at, row.event_id):
        assign(row, **fields)


# ---------------------------------------------------------------------------- ideas, patches


def _idea_proposed(rows: Rows, e: ev.IdeaProposed, at: datetime) -> None:
    idea = idea_row(rows, e.search_id, e.idea_id, e.generation)
    if claims(at, e.event_id, idea.proposed_at, idea.proposed_event_id):
        assign(
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
    refresh_idea_status(idea)


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
        preflight=dump(e.preflight),
        seed=e.seed,
    )
    patch = rows.get(PatchRow, (e.patch_id,))
    if patch is None:
        rows.get_or_create(PatchRow, (e.patch_id,), **fields)
    elif claims(at, e.event_id, patch.created_at, patch.event_id):
        assign(patch, **fields)
    idea = idea_row(rows, e.search_id, e.idea_id, e.generation)
    if claims(at, e.event_id, idea.patched_at, idea.patch_event_id):
        assign(idea, patch_id=e.patch_id, patched_at=at, patch_event_id=e.event_id)
    refresh_idea_status(idea)


def _patch_failed(rows: Rows, e: ev.PatchFailed, at: datetime) -> None:
    idea = idea_row(rows, e.search_id, e.idea_id, e.generation)
    if claims(at, e.event_id, idea.patch_failed_at, idea.patch_failed_event_id):
        assign(
            idea,
            patch_failed_at=at,
            patch_failed_event_id=e.event_id,
            patch_stage=e.stage,
            patch_error=e.last_error,
            patch_attempts=e.attempts,
            patch_failed_cost_usd=e.usage.cost_usd,
        )
    refresh_idea_status(idea)


FOLDS: dict[type[ev.Event], Callable[[Rows, Any, datetime], None]] = {
    ev.SearchStarted: _search_started,
    ev.GenerationAdvanced: _generation_advanced,
    ev.IdeaProposed: _idea_proposed,
    ev.PatchReady: _patch_ready,
    ev.PatchFailed: _patch_failed,
    ev.RunRequested: run_requested,
    ev.RunStarted: run_started,
    ev.RunCompleted: run_completed,
    ev.SearchCompleted: _search_completed,
    ev.PolicyUpdated: _policy_updated,
    ev.SearchStopped: _search_stopped,
    ev.IdeasShortfall: _ideas_shortfall,
}


def fold(rows: Rows, event: ev.Event, at: datetime | None = None) -> None:
    """Fold one event into the projections (no transaction handling, no tracking record).
    `at`: the event's occurred_at as aware UTC, when the caller has it already."""
    FOLDS[type(event)](rows, event, as_utc(event.occurred_at) if at is None else at)
