"""What a search's model calls cost, from the projections: one computation for the API, the
report and the progress line. Ideator calls are on ideas, successful implementations on
patches, failed implementations' dollars on ideas (their tokens are not projected)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func
from sqlmodel import Session, select

from groundloop.api.store import IdeaRow, PatchRow


@dataclass(frozen=True)
class ModelUsage:
    input_tokens: int
    output_tokens: int
    cost_usd: float


def model_usage(session: Session, search_id: str) -> ModelUsage:
    tokens_in = tokens_out = 0
    cost = 0.0
    for table, extra in ((IdeaRow, IdeaRow.patch_failed_cost_usd), (PatchRow, None)):
        spent = table.cost_usd + extra if extra is not None else table.cost_usd
        row = session.exec(
            select(
                func.coalesce(func.sum(table.input_tokens), 0),
                func.coalesce(func.sum(table.output_tokens), 0),
                func.coalesce(func.sum(spent), 0.0),
            ).where(table.search_id == search_id)
        ).one()
        tokens_in, tokens_out, cost = tokens_in + row[0], tokens_out + row[1], cost + row[2]
    return ModelUsage(int(tokens_in), int(tokens_out), float(cost))
