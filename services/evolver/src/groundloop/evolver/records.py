"""What the evolver's state remembers of each run, idea and generation of a search.

Plain mutable records; `groundloop.evolver.state.SearchState` changes them as it folds events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from groundloop.events import GenerationPlan

TERMINAL_RUN_STATUSES = frozenset({"succeeded", "failed", "timed_out", "killed", "rejected"})
TERMINAL_IDEA_STATUSES = frozenset({"patch_failed", "done"})
# An idea's status only moves forward; a late or redelivered event never moves it back.
_IDEA_STATUS_RANK = {"proposed": 0, "patched": 1, "running": 2, "done": 3, "patch_failed": 3}


@dataclass
class RunRecord:
    run_id: str
    purpose: str  # search | baseline | reeval
    idea_id: str | None
    seed: int
    generation: int
    patch_id: str | None = None
    status: str = "requested"  # requested | running | one of TERMINAL_RUN_STATUSES
    score: float | None = None
    reward: float = 0.0
    gpu_seconds: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_RUN_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded" and self.score is not None


@dataclass
class PatchRef:
    """What a re-evaluation run needs to rebuild an idea's workspace."""

    patch_id: str
    diff: str | None
    diff_key: str | None
    resource_class: str


class Measured(NamedTuple):
    """An idea's succeeded runs of one purpose, as of `run_count` entries in its run_ids.
    Exact while that count holds: run_ids only grows, and a run joins it when it completes,
    after which the fold never changes that run again."""

    run_count: int
    scores: list[float]
    rewards: list[float]
    mean_reward: float | None


@dataclass
class IdeaRecord:
    idea_id: str
    generation: int
    order: int  # position of first appearance in the log: the stable tie-breaker
    mode: str = "fresh"
    title: str = ""
    parent_ids: list[str] = field(default_factory=list)
    status: str = "proposed"
    patch: PatchRef | None = None
    run_ids: list[str] = field(default_factory=list)
    # purpose -> its measures, kept because every idea is ranked at every opening
    measured: dict[str, Measured] = field(default_factory=dict, repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_IDEA_STATUSES

    def advance(self, status: str) -> None:
        """Move the status forward to `status`; never back (a late or redelivered event)."""
        if _IDEA_STATUS_RANK[status] > _IDEA_STATUS_RANK[self.status]:
            self.status = status


@dataclass
class GenerationRecord:
    generation: int
    event_id: str | None = None
    opened_at: datetime | None = None
    plan: GenerationPlan | None = None
    idea_ids: list[str] = field(default_factory=list)
    baseline_run_ids: list[str] = field(default_factory=list)
    shortfall: int | None = None  # ideas the ideator could write, when fewer than planned
    summarised: bool = False  # a GenerationAdvanced carried its summary as `previous`

    @property
    def planned(self) -> int:
        plan = self.plan or GenerationPlan()
        return plan.fresh + plan.explore + plan.exploit + plan.rl

    @property
    def expected(self) -> int:
        """Ideas the generation waits for: the plan, or fewer after an IdeasShortfall (which
        counts the ideator's slots only; the policy always writes its `rl` slots)."""
        plan = self.plan or GenerationPlan()
        ideator = plan.fresh + plan.explore + plan.exploit
        if self.shortfall is not None:
            ideator = min(ideator, self.shortfall)
        return ideator + plan.rl
