"""Read routes for one idea (and its lineage), one run, one patch."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel import SQLModel, col, select

from groundloop.api.deps import SessionDep, found
from groundloop.api.store import IdeaRow, PatchRow, RunRow

router = APIRouter(tags=["ideas"], responses={404: {"description": "not found in the projections"}})

MAX_LINEAGE_NODES = 1000


class LineageNode(SQLModel):
    idea_id: str
    depth: int  # 0: the idea asked about; 1: its parents; …
    known: bool  # False: a parent id with no IdeaProposed in the projections
    parent_ids: list[str]
    title: str | None = None
    generation: int | None = None
    mode: str | None = None
    status: str | None = None
    best_reward: float | None = None
    best_score: float | None = None


class Lineage(SQLModel):
    idea_id: str
    nodes: list[LineageNode]  # breadth first: the idea, its parents, their parents…
    truncated: bool


@router.get("/ideas/{idea_id}", response_model=IdeaRow)
def get_idea(idea_id: str, session: SessionDep) -> IdeaRow:
    return found(session.get(IdeaRow, idea_id), "idea", idea_id)  # type: ignore[return-value]


@router.get("/ideas/{idea_id}/lineage", response_model=Lineage)
def lineage(
    idea_id: str, session: SessionDep, max_depth: Annotated[int, Query(ge=0, le=1000)] = 100
) -> Lineage:
    """Every ancestor through parent_ids (exploit ideas combine several parents), each once,
    at the depth where it is first reached."""
    found(session.get(IdeaRow, idea_id), "idea", idea_id)
    nodes: list[LineageNode] = []
    seen = {idea_id}
    level, depth, truncated = [idea_id], 0, False
    while level:
        rows = {
            r.idea_id: r
            for r in session.exec(select(IdeaRow).where(col(IdeaRow.idea_id).in_(level)))
        }
        following: list[str] = []
        for current in level:
            row = rows.get(current)
            parents = list(row.parent_ids) if row is not None else []
            nodes.append(
                LineageNode(
                    idea_id=current,
                    depth=depth,
                    known=row is not None,
                    parent_ids=parents,
                    **(
                        row.model_dump(
                            include=set(LineageNode.model_fields) - {"idea_id", "parent_ids"}
                        )
                        if row is not None
                        else {}
                    ),
                )
            )
            for parent in parents:
                if parent not in seen:
                    seen.add(parent)
                    following.append(parent)
        if following and (depth >= max_depth or len(seen) > MAX_LINEAGE_NODES):
            truncated = True
            break
        level, depth = following, depth + 1
    return Lineage(idea_id=idea_id, nodes=nodes, truncated=truncated)


@router.get("/runs/{run_id}", response_model=RunRow)
def get_run(run_id: str, session: SessionDep) -> RunRow:
    return found(session.get(RunRow, run_id), "run", run_id)  # type: ignore[return-value]


@router.get("/patches/{patch_id}", response_model=PatchRow)
def get_patch(patch_id: str, session: SessionDep) -> PatchRow:
    return found(session.get(PatchRow, patch_id), "patch", patch_id)  # type: ignore[return-value]
