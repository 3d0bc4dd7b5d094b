"""The one ranking of a search's ideas: every surface that says how an idea did (the report,
the API leaderboard, `groundloop search`'s progress line, the ideator's context) uses it.

Rules, so that numbers compare like with like:

- Only search-split runs count (purpose "search", or "baseline" for the unpatched baseline):
  final re-evaluation runs ("reeval", on the manifest's final split) are reported on their
  own and never move an idea up or down, nor the best-so-far curve.
- An idea's number is the MEAN over its succeeded search-split runs, shown with that count
  (the baseline runs on several seeds, an idea may be re-run): a lucky seed does not outrank
  a measured mean.
- Order is by mean reward, best first. Reward is higher-is-better whatever the metric's
  direction (the manifest's transform makes it so), which is the order the evolver selects
  parents and final candidates by; ties go to the smaller idea id. `direction` (the Metric's)
  is only needed to say which of two raw scores is better.

Pure functions over plain values, so the projector, the API, the CLI and the ideator (which
must not import each other) share them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from math import fsum
from typing import Any, Literal

SEARCH_PURPOSES = frozenset({"search", "baseline"})
FINAL_PURPOSE = "reeval"
Direction = Literal["minimize", "maximize"]


def on_search_split(purpose: str | None) -> bool:
    """Is a run of this purpose measured on the search split (and so ranked)?"""
    return purpose in SEARCH_PURPOSES


@dataclass(frozen=True)
class RunResult:
    """What ranking needs of one completed run. `completed_at` is anything that orders runs
    by completion (a datetime, a log position); `run_id` breaks ties deterministically."""

    idea_id: str | None
    purpose: str | None
    score: float | None
    reward: float | None
    completed_at: Any = None
    run_id: str = ""
    succeeded: bool = True

    @property
    def counts(self) -> bool:
        """A succeeded search-split run with a score: one of the values an idea's mean is of."""
        return (
            self.succeeded
            and on_search_split(self.purpose)
            and self.score is not None
            and self.reward is not None
        )


@dataclass(frozen=True)
class Standing:
    """An idea's search-split result: the mean of `runs` succeeded runs, and its best run."""

    idea_id: str
    runs: int
    mean_score: float
    mean_reward: float
    best_score: float
    best_reward: float
    best_run_id: str


def mean(values: Iterable[float]) -> float:
    """Mean independent of the values' order (fsum), so a projection rebuilt from the log in
    any order stores the same number."""
    items = sorted(values)
    return fsum(items) / len(items)


def standing(idea_id: str, results: Iterable[tuple[str, float, float]]) -> Standing | None:
    """The standing of one idea from its counted runs' (run id, score, reward); None if none.
    The best run is the highest reward; equal rewards go to the smaller run id."""
    rows = sorted(results)
    if not rows:
        return None
    best = min(rows, key=lambda r: (-r[2], r[0]))
    return Standing(
        idea_id=idea_id,
        runs=len(rows),
        mean_score=mean(r[1] for r in rows),
        mean_reward=mean(r[2] for r in rows),
        best_score=best[1],
        best_reward=best[2],
        best_run_id=best[0],
    )


def standings(runs: Iterable[RunResult]) -> dict[str, Standing]:
    """Every idea with at least one counted run (runs without an idea, the unpatched
    baseline's, are left to `baseline`)."""
    by_idea: dict[str, list[tuple[str, float, float]]] = {}
    for run in runs:
        if run.counts and run.idea_id is not None:
            by_idea.setdefault(run.idea_id, []).append((run.run_id, run.score, run.reward))  # type: ignore[arg-type]
    found = (standing(idea_id, rows) for idea_id, rows in by_idea.items())
    return {s.idea_id: s for s in found if s is not None}


def rank_key(s: Standing) -> tuple[float, str]:
    return (-s.mean_reward, s.idea_id)


def ranked(runs: Iterable[RunResult]) -> list[Standing]:
    """Ideas with a search-split result, best mean reward first."""
    return sorted(standings(runs).values(), key=rank_key)


def baseline(runs: Iterable[RunResult]) -> list[float]:
    """Scores of the unpatched baseline's succeeded search-split runs, in completion order."""
    done = [r for r in runs if r.counts and r.idea_id is None and r.purpose == "baseline"]
    return [r.score for r in sorted(done, key=_completion_key)]  # type: ignore[misc]


@dataclass(frozen=True)
class CurvePoint:
    """The leader just after the `position`-th counted idea run completed (run `run_id`)."""

    position: int
    run_id: str
    completed_at: Any
    idea_id: str
    mean_score: float
    runs: int


def best_so_far(runs: Iterable[RunResult]) -> list[CurvePoint]:
    """The best-so-far curve by completion order: a point whenever the leader (or its mean)
    changes after an idea's search-split run completes. The baseline's runs and final
    re-evaluation runs never add one."""
    done = sorted(
        (r for r in runs if r.counts and r.idea_id is not None and r.purpose != "baseline"),
        key=_completion_key,
    )
    by_idea: dict[str, list[tuple[str, float, float]]] = {}
    current: dict[str, Standing] = {}
    curve: list[CurvePoint] = []
    for position, run in enumerate(done, start=1):
        idea_id = run.idea_id or ""
        by_idea.setdefault(idea_id, []).append((run.run_id, run.score, run.reward))  # type: ignore[arg-type]
        current[idea_id] = standing(idea_id, by_idea[idea_id])  # type: ignore[assignment]
        leader = min(current.values(), key=rank_key)
        if curve and (curve[-1].idea_id, curve[-1].mean_score) == (
            leader.idea_id,
            leader.mean_score,
        ):
            continue
        curve.append(
            CurvePoint(
                position,
                run.run_id,
                run.completed_at,
                leader.idea_id,
                leader.mean_score,
                leader.runs,
            )
        )
    return curve


def better(a: float, b: float, direction: Direction) -> bool:
    """Is raw score `a` better than `b` for a metric of this direction?"""
    return a < b if direction == "minimize" else a > b


def _completion_key(run: RunResult) -> tuple[bool, Any, str]:
    return (run.completed_at is None, run.completed_at or 0, run.run_id)
