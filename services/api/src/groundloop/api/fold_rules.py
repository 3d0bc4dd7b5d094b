"""The rules every fold follows: which event wins a column group, how identity fields are
filled, and an idea's status derived from its columns (see groundloop.api.folds for why)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from groundloop import events as ev
from groundloop.api.rowset import Row, Rows
from groundloop.api.store import IdeaRow


def claims(at: datetime, event_id: str, held_at: datetime | None, held_by: str | None) -> bool:
    """Does this event win a column group over the event that holds it (earliest wins)?"""
    return held_by is None or (at, event_id) < (held_at, held_by)


def fill(row: Any, **fields: Any) -> None:
    """Identity fields: set those still unknown, never overwrite."""
    for name, value in fields.items():
        if value is not None and getattr(row, name) is None:
            setattr(row, name, value)


def assign(row: Row, **fields: Any) -> None:
    """A column group this event won: overwrite every field."""
    row.set_columns(fields)


def dump(model: ev.Record | None) -> Any:
    return None if model is None else model.model_dump(mode="json")


def idea_row(rows: Rows, search_id: str, idea_id: str, generation: int | None) -> Row:
    """The idea's row, created as a stub by whichever event mentions the idea first."""
    idea = rows.get_or_create(IdeaRow, (idea_id,), search_id=search_id)
    fill(idea, generation=generation)
    return idea


def refresh_idea_status(idea: Row) -> None:
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
