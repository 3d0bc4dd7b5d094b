"""Hard run and GPU-hour budgets: how many more runs may be dispatched without overshooting.

Every run counts, the final re-evaluation's included: the meter is every run in the log
(requested, running or done) plus one run for each idea an opened generation still waits for
(each becomes at most one search run). A generation is opened only with as many ideas as fit
after keeping room for the final re-evaluation, so a search never dispatches run N+1 of a
budget of N. A run's GPU-seconds are estimated from the manifest (wall_seconds × gpus) until
its RunCompleted reports what it used.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # state.py imports this module
    from .state import SearchState


def run_gpu_seconds(env: Any) -> float:
    """The GPU-seconds one run may use: its wall-clock cap on all of its GPUs (0 on a CPU
    environment, whose runs report no GPU time)."""
    budget, resources = getattr(env, "budget", None), getattr(env, "resources", None)
    if budget is None or resources is None:
        return 0.0
    return float(budget.wall_seconds) * int(resources.gpus)


def pending_idea_runs(state: SearchState) -> int:
    """Search runs that opened generations may still start: expected ideas without a run
    in the log and without a failed patch."""
    pending = 0
    for record in state.generations.values():
        if record.event_id is None:
            continue
        ideas = [state.ideas[i] for i in record.idea_ids]
        resolved = sum(1 for idea in ideas if idea.status in ("patch_failed", "running", "done"))
        pending += max(0, max(record.expected, len(ideas)) - resolved)
    return pending


def committed_runs(state: SearchState) -> int:
    """Every run dispatched or on its way, whatever its purpose: the run budget's meter."""
    return len(state.runs) + pending_idea_runs(state)


def committed_gpu_seconds(state: SearchState, per_run: float) -> float:
    """GPU-seconds used by finished runs plus the estimate of every unfinished one."""
    unfinished = sum(1 for run in state.runs.values() if not run.terminal)
    used = sum(run.gpu_seconds for run in state.runs.values() if run.terminal)
    return used + per_run * (unfinished + pending_idea_runs(state))


def headroom(state: SearchState, env: Any, reserve: int = 0) -> int | None:
    """How many more runs may be dispatched, `reserve` runs kept back (for the final
    re-evaluation); None when no run or GPU-hour budget limits it. May be negative."""
    if state.started is None:
        return None
    budgets = state.started.config.budgets
    limits: list[int] = []
    if budgets.max_runs is not None:
        limits.append(budgets.max_runs - committed_runs(state) - reserve)
    per_run = run_gpu_seconds(env)
    if budgets.gpu_hours is not None and per_run > 0:
        left = budgets.gpu_hours * 3600 - committed_gpu_seconds(state, per_run)
        limits.append(math.floor(left / per_run + 1e-9) - reserve)
    return min(limits) if limits else None


def dollar_headroom(state: SearchState) -> int | None:
    """Ideas the dollar budget still pays for at the mean cost of an idea so far (proposal
    and implementation); None without a dollar budget or before any idea cost anything."""
    if state.started is None or state.started.config.budgets.dollars is None:
        return None
    ideas = sum(1 for idea in state.ideas.values() if idea.mode != "baseline" and idea.terminal)
    if ideas == 0 or state.cost_usd <= 0:
        return None
    per_idea = state.cost_usd / ideas
    return math.floor((state.started.config.budgets.dollars - state.cost_usd) / per_idea + 1e-9)


def no_room_reason(state: SearchState) -> str:
    """Why the next generation does not open although no budget is spent yet: it would not
    fit with the final re-evaluation kept. A function of the log only, so the reason folded
    from the first re-evaluation request is the same on every replay."""
    assert state.started is not None
    budgets = state.started.config.budgets
    searched = sum(1 for run in state.runs.values() if run.purpose != "reeval")
    meters = []
    if budgets.max_runs is not None:
        meters.append(f"runs: {searched + pending_idea_runs(state)} of {budgets.max_runs}")
    if budgets.gpu_hours is not None:
        used = sum(run.gpu_seconds for run in state.runs.values() if run.terminal)
        meters.append(f"GPU-hours: {used / 3600:.3g} of {budgets.gpu_hours:g}")
    if budgets.dollars is not None:
        meters.append(f"dollars: {state.cost_usd:.2f} of {budgets.dollars:.2f}")
    return (
        "budget spent: the next generation would not fit with the final re-evaluation "
        f"kept ({'; '.join(meters) or 'no budget'})"
    )
