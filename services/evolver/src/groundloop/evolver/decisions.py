"""The evolver's decisions: a pure function of a search's state, its manifest and the clock.

`decide(state, deps, cause)` returns what the evolver must emit now: baseline RunRequested
events before generation 0 (on the steady schedule, beside it), GenerationAdvanced when a generation closes (every idea terminal,
or its deadline passed), final re-evaluation RunRequested events once a budget is spent or
the generations are done, and SearchCompleted with mean ± 95 % CI and Welch p-values.
`service.handle` folds an event and calls it; `service.tick` calls it for deadlines. A
generation whose ideator reported an IdeasShortfall closes once the ideas it got are terminal.
A search with a SearchStopped (the model cannot be reached, say) gets no further decision:
no run, no generation, and no SearchCompleted, so a stopped search is never reported as a
success; its end is the SearchStopped itself.

Output ids are a function of the decision, not of what triggered it (`decision_context.decision_id`): the
last RunCompleted of a generation, a deadline tick and a restarted evolver all reach "advance
to g+1" or "re-run idea X on seed s" under the same event id, so JetStream's de-duplication
(and, for GenerationAdvanced, the once-per-subject guard) keeps exactly one. Occurred-at
times come from `deps.clock`; the causation is the triggering event (for a tick, the open
generation's GenerationAdvanced).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from groundloop.events import (
    Event,
    FinalEvaluation,
    GenerationAdvanced,
    GenerationSummary,
    SearchCompleted,
    stable_id,
)
from groundloop.manifest import Metric

from .algorithm import exploit_share, plan_generation
from .budget import dollar_headroom, headroom, no_room_reason
from .decision_context import (
    Decision,
    Deps,
    baseline_run_id,
    reeval_run_id,
    seeds_for,
)
from .state import SearchState
from .stats import mean, mean_ci, welch_t_test

log = logging.getLogger(__name__)


def decide(state: SearchState, deps: Deps, cause: Event | None) -> list[Event]:
    """Everything the evolver should emit now, given the state. A pure function of the
    state, the environment's manifest and the clock (deadlines only)."""
    if state.started is None or state.ended:
        return []  # a stopped search gets no SearchCompleted: SearchStopped is its end
    try:
        env = deps.environments(state.started.environment)
        exploit_share(state.started.config.exploit_schedule, 1)
    except Exception as exc:  # a search this evolver can never run: end it, saying why
        problem = f"{exc.__class__.__name__}: {exc}"
        return [
            Decision(state, deps, cause, env=None).completed(f"cannot run this search: {problem}")
        ]
    ctx = Decision(state, deps, cause, env)
    if state.final_started:
        return _final_phase(ctx)
    if state.current_generation is None:
        return _baseline_phase(ctx)
    if _steady(ctx) and (failure := _baseline_failure(ctx)) is not None:
        return [ctx.completed(failure)]
    generation = state.current_generation
    if _deadline_passed(ctx, generation):
        return _advance(ctx, generation + 1)
    if state.generation_complete(generation) and _earlier_settled(ctx, generation):
        return _advance(ctx, generation + 1)
    if _may_open_early(ctx, generation):
        return _advance(ctx, generation + 1, early=True)
    return []


# ---------------------------------------------------------------------------- phases


def _baseline_phase(ctx: Decision) -> list[Event]:
    """Measure the unpatched baseline on k seeds before generation 0 (β on this hardware). On
    the steady schedule generation 0, whose plan needs no β, opens as soon as the baseline runs
    are requested (so it counts them against the budgets) and runs beside them; generation 1
    waits for the baseline (`_earlier_settled`)."""
    seeds = seeds_for(ctx.env.seeds, ctx.config.baseline_seeds)
    run_ids = {seed: baseline_run_id(ctx.state.search_id, seed) for seed in seeds}
    missing = [seed for seed in seeds if run_ids[seed] not in ctx.state.runs]
    if missing:
        room = headroom(ctx.state, ctx.env, _final_reserve(ctx) + 1)
        if room is not None and room < len(missing):
            return [ctx.completed(f"cannot run this search: {_too_small(ctx)}")]
        return [ctx.run_request(run_ids[seed], "baseline", seed, 0) for seed in missing]
    if not _baseline_settled(ctx):
        return _advance(ctx, 0) if _steady(ctx) else []
    if (failure := _baseline_failure(ctx)) is not None:
        return [ctx.completed(failure)]
    return _advance(ctx, 0)


def _baseline_runs(ctx: Decision) -> list[Any]:
    seeds = seeds_for(ctx.env.seeds, ctx.config.baseline_seeds)
    ids = (baseline_run_id(ctx.state.search_id, seed) for seed in seeds)
    return [ctx.state.runs[run_id] for run_id in ids if run_id in ctx.state.runs]


def _baseline_settled(ctx: Decision) -> bool:
    return all(run.terminal for run in _baseline_runs(ctx))


def _baseline_failure(ctx: Decision) -> str | None:
    """Why the search cannot go on when every baseline run has ended and none succeeded."""
    runs = _baseline_runs(ctx)
    if not runs or not all(run.terminal for run in runs) or any(run.succeeded for run in runs):
        return None
    statuses = ", ".join(f"seed {run.seed}: {run.status}" for run in runs)
    return (
        f"baseline failed on every seed ({statuses}); the environment "
        "does not run as shipped, so no idea can be measured against it"
    )


def _deadline_passed(ctx: Decision, generation: int) -> bool:
    deadline_s = ctx.config.generation_deadline_s
    opened = ctx.state.generations[generation].opened_at
    return (
        deadline_s is not None
        and opened is not None
        and ctx.now >= opened + timedelta(seconds=deadline_s)
    )


def _steady(ctx: Decision) -> bool:
    return ctx.config.schedule == "steady" and ctx.started.strategy == "evolution"


def _earlier_settled(ctx: Decision, generation: int) -> bool:
    """Every generation before `generation` complete or past its deadline. Always so on the
    generational schedule; on the steady one a generation may open before the previous is
    complete, and neither the next early opening nor the final re-evaluation may leave an
    older generation's results behind."""
    if not _steady(ctx):
        return True
    return _baseline_settled(ctx) and all(
        _settled(ctx, g) for g in ctx.state.advanced_generations if g < generation
    )


def _settled(ctx: Decision, generation: int) -> bool:
    """Every result of `generation` in, or its deadline passed: nothing more is waited for."""
    return ctx.state.generation_complete(generation) or _deadline_passed(ctx, generation)


def _may_open_early(ctx: Decision, generation: int) -> bool:
    """Steady schedule: the next generation opens once every idea of this one is written,
    half of them are terminal and every older generation is settled, so the next ideas are
    written and patched while this generation's last runs hold the slots. (All written
    first: the ideator writes one generation at a time, each knowing every earlier idea.)
    The decision is taken at the log entry that makes the count reach half, so every
    replica takes it on the same state."""
    if not _steady(ctx) or not _earlier_settled(ctx, generation):
        return False
    record = ctx.state.generations[generation]
    if len(record.idea_ids) < record.expected:
        return False
    terminal = sum(1 for i in record.idea_ids if ctx.state.ideas[i].terminal)
    return 2 * terminal >= record.expected > 0


def _advance(ctx: Decision, generation: int, *, early: bool = False) -> list[Event]:
    """Open `generation`, or, when a budget is spent or the generations are done, begin the
    final re-evaluation. An `early` opening (steady schedule) never begins the final phase:
    that waits until every open generation is complete."""
    reason = ctx.state.stop_reason(next_generation=generation)
    if reason is not None:
        return [] if early else _begin_final(ctx, reason)
    state, config = ctx.state, ctx.config
    size = config.ideas_per_generation
    for room in (headroom(state, ctx.env, _final_reserve(ctx)), dollar_headroom(state)):
        size = size if room is None else min(size, room)
    if size <= 0:  # the next run would overshoot a budget: stop before dispatching it
        return [] if early else _begin_final(ctx, no_room_reason(state))
    beta = state.beta()
    plan = plan_generation(
        generation=generation,
        strategy=ctx.started.strategy,
        config=config,
        size=size,
        past=state.past_ideas(generation),
        beta=beta[1] if beta else None,
        search_seed=ctx.started.seed,
        rl_share=ctx.started.rl.share if ctx.started.rl else 1.0,
    )
    previous = _closed_summary(ctx, generation)
    log.info("search %s: opening generation %d (%s)", state.search_id, generation, plan)
    return [
        ctx.event(
            GenerationAdvanced,
            "generation",
            generation,
            generation=generation,
            plan=plan,
            previous=previous,
            best_so_far=state.best_so_far(),
        )
    ]


def _closed_summary(ctx: Decision, generation: int) -> GenerationSummary | None:
    """The summary carried by the opening of `generation`: of the generation before it on
    the generational schedule. On the steady one, where openings run ahead of closings, of
    the oldest settled generation not yet summarised, so each generation's summary is given
    once and only when all of its results are in."""
    if generation == 0:
        return None
    if not _steady(ctx):
        return ctx.state.summary(generation - 1)
    for g in ctx.state.advanced_generations:
        record = ctx.state.generations[g]
        if g >= generation or record.summarised:
            continue
        return ctx.state.summary(g) if _settled(ctx, g) else None
    return None


def _final_unpatched_purpose(metric: Metric) -> str:
    """Re-evaluation runs use the final split when the manifest has one (the runner picks the
    split by purpose), so the baseline they are compared with must run the same way."""
    return "reeval" if metric.final_split and metric.final_split != metric.split else "baseline"


def _final_baseline_run_id(ctx: Decision, seed: int) -> str:
    if _final_unpatched_purpose(ctx.env.metric) == "baseline":
        return baseline_run_id(ctx.state.search_id, seed)
    return stable_id(ctx.state.search_id, "reeval", "baseline", seed)


def _begin_final(ctx: Decision, reason: str) -> list[Event]:
    """Choose the top-k ideas by search reward and request their re-evaluation runs."""
    chosen = [
        idea_id
        for idea_id, _ in ctx.state.ranked_ideas()
        if ctx.state.ideas[idea_id].patch is not None
    ][: ctx.config.final_top_k]
    if not chosen:
        return [ctx.completed(f"{reason}; no idea produced a result to re-evaluate")]
    log.info("search %s: %s; re-evaluating %d ideas", ctx.state.search_id, reason, len(chosen))
    return _final_requests(ctx, chosen)


def _final_reserve(ctx: Decision) -> int:
    """Runs the final re-evaluation may still need: top-k ideas and the baseline on each
    final seed (baseline runs already in the log are reused)."""
    seeds = seeds_for(ctx.env.seeds, ctx.config.final_seeds)
    reused = sum(1 for s in seeds if _final_baseline_run_id(ctx, s) in ctx.state.runs)
    return (ctx.config.final_top_k + 1) * len(seeds) - reused


def _too_small(ctx: Decision) -> str:
    budgets = ctx.config.budgets
    need = ctx.config.baseline_seeds + 1 + _final_reserve(ctx)
    return (
        f"the budget (runs: {budgets.max_runs}, GPU-hours: {budgets.gpu_hours}) cannot pay for "
        f"the baseline, one idea and the final re-evaluation ({need} runs); raise --max-runs "
        "or --gpu-hours, or lower --baseline-seeds, --final-top-k or --final-seeds"
    )


def _final_requests(ctx: Decision, ideas: list[str]) -> list[Event]:
    """Every final run of `ideas` and of the baseline not yet requested (idempotent), as
    many as the run and GPU-hour budgets still allow."""
    state, generation = ctx.state, ctx.state.current_generation or 0
    seeds = seeds_for(ctx.env.seeds, ctx.config.final_seeds)
    out: list[Event] = []
    for idea_id in ideas:
        for seed in seeds:
            run_id = reeval_run_id(state.search_id, idea_id, seed)
            if run_id not in state.runs:
                out.append(ctx.run_request(run_id, "reeval", seed, generation, idea_id=idea_id))
    purpose = _final_unpatched_purpose(ctx.env.metric)
    for seed in seeds:
        run_id = _final_baseline_run_id(ctx, seed)
        if run_id not in state.runs:
            out.append(ctx.run_request(run_id, purpose, seed, generation))
    room = headroom(state, ctx.env)
    return out if room is None else out[: max(room, 0)]


def _final_phase(ctx: Decision) -> list[Event]:
    """Wait for every re-evaluation run; then report and complete the search."""
    state = ctx.state
    ideas = list(
        dict.fromkeys(
            run.idea_id
            for run in state.runs.values()
            if run.purpose == "reeval" and run.idea_id is not None
        )
    )
    missing = _final_requests(ctx, ideas)
    if missing:
        return missing
    seeds = seeds_for(ctx.env.seeds, ctx.config.final_seeds)
    # A run the budget did not allow is not in the log; the rest are compared.
    final_ids = [reeval_run_id(state.search_id, i, s) for i in ideas for s in seeds]
    final_runs = [state.runs[r] for r in final_ids if r in state.runs]
    baseline_ids = [_final_baseline_run_id(ctx, s) for s in seeds]
    baseline = [state.runs[r] for r in baseline_ids if r in state.runs]
    if not all(run.terminal for run in final_runs + baseline):
        return []
    baseline_scores = [run.score for run in baseline if run.succeeded and run.score is not None]
    return [_search_completed(ctx, ideas, baseline_scores)]


def _search_completed(
    ctx: Decision, ideas: list[str], baseline_scores: list[float]
) -> SearchCompleted:
    state = ctx.state
    final: list[FinalEvaluation] = []
    for idea_id in ideas:
        scores = state.idea_scores(idea_id, "reeval")
        if not scores:
            log.warning(
                "search %s: idea %s failed every re-evaluation run", state.search_id, idea_id
            )
            continue
        interval = mean_ci(scores)
        p_value = (
            welch_t_test(scores, baseline_scores).p_value
            if len(scores) >= 2 and len(baseline_scores) >= 2
            else None
        )
        final.append(
            FinalEvaluation(
                idea_id=idea_id,
                scores=scores,
                mean=interval.mean,
                ci95_low=interval.low,
                ci95_high=interval.high,
                p_value_vs_baseline=p_value,
            )
        )
    by_reward = sorted(
        (e for e in final), key=lambda e: -(state.idea_reward(e.idea_id, "reeval") or 0.0)
    )
    best = by_reward[0] if by_reward else None
    fallback = state.best_so_far() if best is None else None
    return ctx.completed(
        state.final_reason or "stopped",
        best_idea_id=best.idea_id if best else (fallback.idea_id if fallback else None),
        best_score=best.mean if best else (fallback.score if fallback else None),
        baseline_score=mean(baseline_scores) if baseline_scores else None,
        final=final,
    )
