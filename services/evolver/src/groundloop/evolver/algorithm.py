"""Algorithm 1 of the paper (DESIGN §1) as pure functions: how one generation is planned.

Epoch 0 = N fresh ideas. Epoch t > 0 splits N into exploit (show ideas that beat the baseline,
ask to combine or refine them) and explore (show past ideas, failures included, ask for
different ones); the exploit share a(t) follows a named schedule. Best-of-N (and RL, whose
ideas come from the policy) plans only fresh ideas with no context.

Every random choice comes from `generation_rng(search seed, generation)`, and sampling uses
nothing but `Random.random()` (whose stream CPython keeps stable), so a plan is a function of
the log and the seed: a fresh evolver replaying a search re-decides exactly the same plans.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from groundloop.events import GenerationPlan, SearchConfig

SCHEDULE_FORMS = (
    '"paper" = min(0.5 + 0.1·floor(t/2), 0.8) (the released code)',
    '"constant:<a>" = a for every t ≥ 1',
    '"linear:<start>:<step>:<cap>" = min(start + step·(t − 1), cap)',
    '"explore" = 0 (never exploit)',
)


def exploit_share(schedule: str, generation: int) -> float:
    """a(t): the share of generation t's ideas that exploit above-baseline ideas (t ≥ 1)."""
    t = max(generation, 1)  # parse (and so validate) the schedule even for epoch 0
    name, _, args = schedule.partition(":")
    try:
        if name == "paper" and not args:
            share = min(0.5 + 0.1 * (t // 2), 0.8)
        elif name == "explore" and not args:
            share = 0.0
        elif name == "constant":
            share = float(args)
        elif name == "linear":
            start, step, cap = (float(x) for x in args.split(":"))
            share = min(start + step * (t - 1), cap)
        else:
            raise ValueError(schedule)
    except ValueError:
        raise ValueError(
            f"unknown exploit schedule {schedule!r}; use one of: " + "; ".join(SCHEDULE_FORMS)
        ) from None
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"exploit schedule {schedule!r} gives a({t}) = {share}, outside [0, 1]")
    return share if generation > 0 else 0.0


def round_half_up(x: float) -> int:
    """Conventional rounding (Python's round() rounds 2.5 to 2)."""
    return int(math.floor(x + 0.5))


def generation_rng(search_seed: int, generation: int) -> random.Random:
    """The RNG for one generation's decisions, independent of every other generation's."""
    digest = hashlib.sha256(f"groundloop-evolver/{search_seed}/{generation}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class PastIdea:
    """What planning needs to know about one earlier idea."""

    idea_id: str
    generation: int
    reward: float | None  # mean search reward of its succeeded runs; None: no result (yet)
    status: str


def sample_uniform(ids: Sequence[str], k: int, rng: random.Random) -> list[str]:
    """≤ k ids, uniformly without replacement, in their input order."""
    if len(ids) <= k:
        return list(ids)
    keys = [rng.random() for _ in ids]
    chosen = set(sorted(range(len(ids)), key=lambda i: keys[i])[:k])
    return [ids[i] for i in range(len(ids)) if i in chosen]


def sample_weighted(items: Sequence[tuple[str, float]], k: int, rng: random.Random) -> list[str]:
    """≤ k ids without replacement, each drawn with probability ∝ its positive weight
    (Efraimidis–Spirakis: key = u^(1/w), keep the k largest), in their input order."""
    if len(items) <= k:
        return [idea_id for idea_id, _ in items]
    keys = []
    for _, weight in items:
        u = rng.random()
        keys.append(math.log(u if u > 0 else 1e-300) / max(weight, 1e-12))
    chosen = set(sorted(range(len(items)), key=lambda i: keys[i], reverse=True)[:k])
    return [items[i][0] for i in range(len(items)) if i in chosen]


def positive_ideas(past: Sequence[PastIdea], beta: float | None) -> list[PastIdea]:
    """Ideas whose reward beats the baseline's (reward is higher-is-better whatever the
    metric's direction, so this is direction-aware). No baseline measured: nothing is positive."""
    if beta is None:
        return []
    return [idea for idea in past if idea.reward is not None and idea.reward > beta]


def plan_generation(
    *,
    generation: int,
    strategy: str,
    config: SearchConfig,
    size: int,
    past: Sequence[PastIdea],
    beta: float | None,
    search_seed: int,
    rl_share: float = 1.0,
) -> GenerationPlan:
    """Plan generation `generation` with `size` ideas (N, or fewer when a run budget is nearly
    spent), given every earlier idea in proposal order and the baseline reward β."""
    if strategy == "rl":
        return GenerationPlan(rl=size)
    if strategy == "hybrid":
        policy_slots = min(size, max(1, round_half_up(rl_share * size)))
        rest = _evolution_plan(generation, config, size - policy_slots, past, beta, search_seed)
        return rest.model_copy(update={"rl": policy_slots})
    if generation == 0 or strategy != "evolution":
        return GenerationPlan(fresh=size)
    return _evolution_plan(generation, config, size, past, beta, search_seed)


def _evolution_plan(
    generation: int,
    config: SearchConfig,
    size: int,
    past: Sequence[PastIdea],
    beta: float | None,
    search_seed: int,
) -> GenerationPlan:
    if generation == 0 or size == 0:
        return GenerationPlan(fresh=size)
    rng = generation_rng(search_seed, generation)
    k = config.context_size
    positives = positive_ideas(past, beta)
    explore_context = sample_uniform([idea.idea_id for idea in past], k, rng)
    if not positives:  # nothing to exploit yet: every slot explores
        return GenerationPlan(explore=size, explore_context_ids=explore_context)
    exploit = min(size, round_half_up(exploit_share(config.exploit_schedule, generation) * size))
    if config.exploit_context == "score_weighted":
        assert beta is not None  # positives imply a baseline
        exploit_context = sample_weighted(
            [(idea.idea_id, idea.reward - beta) for idea in positives if idea.reward is not None],
            k,
            rng,
        )
    else:
        exploit_context = sample_uniform([idea.idea_id for idea in positives], k, rng)
    return GenerationPlan(
        exploit=exploit,
        explore=size - exploit,
        exploit_context_ids=exploit_context if exploit else [],
        explore_context_ids=explore_context if size - exploit else [],
    )
