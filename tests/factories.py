"""The one module of event builders for tests and benchmarks: realistic, deterministic events.

Each builder takes only what a test varies; everything else has a plausible default. Tests
that need a role's own defaults wrap a builder in a small local function rather than copy it.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from groundloop import events as ev

if TYPE_CHECKING:
    from groundloop.execution.environment import Environment

DIGEST = "d" * 64


def search_started(
    search_id: str = "s1",
    environment: str = "synthetic",
    seed: int = 0,
    *,
    environment_digest: str = DIGEST,
    strategy: str = "evolution",
    proposer: ev.ProposerSettings | None = None,
    implementer: ev.ImplementerSettings | None = None,
    price_table: dict[str, ev.ModelPrice] | None = None,
    occurred_at: datetime | None = None,
    rl: ev.RLSettings | None = None,
    **config: object,
) -> ev.SearchStarted:
    """A search's first event; `config` overrides SearchConfig fields (2 generations of 3)."""
    values: dict[str, object] = {"generations": 2, "ideas_per_generation": 3, **config}
    extra = {"occurred_at": occurred_at} if occurred_at is not None else {}
    return ev.SearchStarted(
        event_id=ev.stable_id(search_id, "started"),
        search_id=search_id,
        producer="cli",
        environment=environment,
        environment_digest=environment_digest,
        strategy=strategy,  # type: ignore[arg-type]
        config=ev.SearchConfig(**values),  # type: ignore[arg-type]
        proposer=proposer or ev.ProposerSettings(kind="knobs"),
        implementer=implementer or ev.ImplementerSettings(kind="knobs"),
        price_table=price_table or {},
        seed=seed,
        rl=rl,
        **extra,
    )


def search_started_in(
    env: Environment, search_id: str = "s1", seed: int = 0, **kwargs: object
) -> ev.SearchStarted:
    """`search_started` on a loaded environment: its name and its real digest."""
    return search_started(
        search_id,
        env.name,
        seed,
        environment_digest=env.digest(),
        **kwargs,  # type: ignore[arg-type]
    )


def requested_search(
    env: Environment, search_id: str = "s1", **overrides: object
) -> ev.SearchStarted:
    """A SearchStarted as the CLI and the API build it from a request
    (`search_request.search_started_event`), for a small knob-proposer search on `env`."""
    from groundloop.search_request import search_started_event

    request: dict[str, object] = {
        "strategy": "evolution",
        "generations": 2,
        "ideas": 3,
        "seed": 0,
        "model": None,
        "implementer_model": None,
        "baseline_seeds": 1,
        "final_top_k": 1,
        "final_seeds": 1,
        "deadline": 600.0,
        "budgets": ev.Budgets(),
    }
    return search_started_event(search_id, env, **{**request, **overrides})  # type: ignore[arg-type]


def generation_advanced(
    started: ev.SearchStarted, generation: int, plan: ev.GenerationPlan
) -> ev.GenerationAdvanced:
    """The evolver's go-ahead for `generation` of the search `started` began."""
    return ev.GenerationAdvanced(
        event_id=ev.stable_id(started.search_id, "gen", generation),
        search_id=started.search_id,
        producer="evolver",
        generation=generation,
        plan=plan,
    )


def idea(cause: ev.Event, index: int, generation: int = 0, text_size: int = 400) -> ev.IdeaProposed:
    """The ideator's `index`-th knob idea in answer to `cause` (~`text_size` characters)."""
    idea_id = ev.stable_id(cause.search_id, generation, index)
    return cause.derive(
        ev.IdeaProposed,
        "ideator",
        index,
        idea_id=idea_id,
        generation=generation,
        mode="fresh",
        title=f"idea {index}",
        text=("raise the learning rate and shorten warmup. " * 20)[:text_size],
        proposer=ev.ProposerInfo(kind="knobs"),
        knobs={"LEARNING_RATE": 0.003 + index * 1e-4},
    )


def idea_proposed(
    search_id: str = "s1",
    n: int = 0,
    *,
    idea_id: str | None = None,
    mode: str = "fresh",
    title: str = "raise the learning rate",
    text: str = "Raise the learning rate to 1e-2 in config.py.",
    knobs: dict | None = None,
    proposer: ev.ProposerInfo | None = None,
    generation: int = 0,
) -> ev.IdeaProposed:
    """A generation's `n`-th idea without a cause event: an LLM idea unless `knobs` is given."""
    return ev.IdeaProposed(
        event_id=ev.stable_id(search_id, "idea-event", n),
        search_id=search_id,
        producer="ideator",
        idea_id=idea_id or ev.stable_id(search_id, generation, n),
        generation=generation,
        mode=mode,  # type: ignore[arg-type]
        title=title,
        text=text,
        proposer=proposer or ev.ProposerInfo(kind="llm" if knobs is None else "knobs"),
        knobs=knobs,
    )


def policy_idea(opened: ev.GenerationAdvanced, slot: int, version: int = 0) -> ev.IdeaProposed:
    """The rl-trainer's idea in policy slot `slot` of a generation, from policy `version`."""
    return opened.derive(
        ev.IdeaProposed,
        "rl-trainer",
        slot,
        idea_id=ev.stable_id(opened.search_id, opened.generation, slot),
        generation=opened.generation,
        mode="rl",
        title=f"policy idea {slot}",
        text=f"WIDTH = {64 * (slot + 1)}",
        proposer=ev.ProposerInfo(kind="rl", model="groundloop-knob-lm", policy_version=version),
        knobs={"WIDTH": 64 * (slot + 1)},
    )


def patch_ready(idea_event: ev.IdeaProposed) -> ev.PatchReady:
    """The implementer's one-line config patch for `idea_event`."""
    return idea_event.derive(
        ev.PatchReady,
        "implementer",
        patch_id=ev.stable_id(idea_event.idea_id, "patch"),
        idea_id=idea_event.idea_id,
        generation=idea_event.generation,
        environment="synthetic",
        environment_digest=DIGEST,
        diff="--- a/config.py\n+++ b/config.py\n@@ -1 +1 @@\n-X = 1.0\n+X = 2.0\n",
        diff_digest="e" * 64,
        patched_digest="f" * 64,
        files_changed=["config.py"],
        implementer=ev.ImplementerInfo(kind="knobs"),
        preflight=ev.PreflightReport(
            passed=True, checks=[ev.PreflightCheck(name="compile", ok=True)]
        ),
    )


def patch_for(
    search_id: str,
    index: int,
    *,
    environment: str,
    environment_digest: str,
    diff: str,
    seed: int = 0,
) -> ev.PatchReady:
    """A preflighted patch of config.py for the `index`-th idea, without a cause event."""
    return ev.PatchReady(
        event_id=ev.stable_id(search_id, "patch-event", index),
        search_id=search_id,
        producer="implementer",
        patch_id=ev.stable_id(search_id, "patch", index),
        idea_id=ev.stable_id(search_id, "idea", index),
        generation=0,
        environment=environment,
        environment_digest=environment_digest,
        diff=diff,
        diff_digest="0" * 64,
        patched_digest="0" * 64,
        files_changed=["config.py"],
        implementer=ev.ImplementerInfo(kind="knobs"),
        preflight=ev.PreflightReport(passed=True),
        seed=seed,
    )


def run_started(patch: ev.PatchReady) -> ev.RunStarted:
    return patch.derive(
        ev.RunStarted,
        "runner",
        run_id=ev.stable_id(patch.patch_id, 0),
        patch_id=patch.patch_id,
        idea_id=patch.idea_id,
        runner_id="r1",
        host="localhost",
        seed=0,
    )


def run_completed(patch: ev.PatchReady, score: float) -> ev.RunCompleted:
    """A successful run of `patch` scoring `score`, with provenance."""
    return patch.derive(
        ev.RunCompleted,
        "runner",
        1,
        run_id=ev.stable_id(patch.patch_id, 0),
        patch_id=patch.patch_id,
        idea_id=patch.idea_id,
        generation=patch.generation,
        status="succeeded",
        metrics={"score": score},
        score=score,
        reward=score,
        seed=0,
        wall_seconds=1.5,
        provenance=ev.Provenance(
            environment_digest=DIGEST, seed=0, python="3.11", hardware="cpu", host="h"
        ),
    )


def run_result(
    search_id: str,
    run_id: str,
    *,
    status: str = "succeeded",
    score: float | None = None,
    reward: float | None = None,
    purpose: str = "search",
    idea_id: str | None = None,
    patch_id: str | None = None,
    generation: int = 0,
) -> ev.RunCompleted:
    """A run that ended `status` as the ideator and the evolver read it: no provenance; the
    reward is the score unless given (it differs for metrics that are minimised)."""
    return ev.RunCompleted(
        search_id=search_id,
        producer="runner",
        run_id=run_id,
        idea_id=idea_id,
        patch_id=patch_id,
        generation=generation,
        purpose=purpose,  # type: ignore[arg-type]
        status=status,  # type: ignore[arg-type]
        score=score,
        reward=reward if reward is not None else score or 0.0,
        seed=0,
    )


def run_of_idea(
    idea_event: ev.IdeaProposed, status: str, score: float | None, purpose: str = "search"
) -> ev.RunCompleted:
    """A run of `idea_event` that ended `status`."""
    return run_result(
        idea_event.search_id,
        f"run-{idea_event.idea_id}-{status}",
        status=status,
        score=score,
        purpose=purpose,
        idea_id=idea_event.idea_id,
        generation=idea_event.generation,
    )


def one_search(search_id: str = "s1", ideas: int = 3) -> list[ev.Event]:
    """SearchStarted, GenerationAdvanced, then per idea IdeaProposed → PatchReady → RunStarted
    → RunCompleted, then SearchCompleted."""
    start = search_started(search_id)
    gen = start.derive(
        ev.GenerationAdvanced, "evolver", generation=0, plan=ev.GenerationPlan(fresh=ideas)
    )
    out: list[ev.Event] = [start, gen]
    for i in range(ideas):
        proposed = idea(gen, i)
        patch = patch_ready(proposed)
        out += [proposed, patch, run_started(patch), run_completed(patch, 1.0 + i)]
    out.append(
        gen.derive(
            ev.SearchCompleted,
            "evolver",
            9,
            reason="generations done",
            best_score=float(ideas),
            totals=ev.Totals(ideas=ideas, runs=ideas),
        )
    )
    return out
