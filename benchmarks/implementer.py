"""Implementer and knob-proposer benchmark.

    .venv/bin/python benchmarks/implementer.py [--environment tinygpt] [--patches 12]
        [--ideas 400] [--history 300]

- patches/s: knob ideas turned into PatchReady by the real implementer `handle` (strict
  apply, normalise, materialise a fresh workspace as a runner would, compile, protected
  digests, the manifest's smoke command in the sandbox), one after another; no model latency.
  Also split into the pre-flight checks' own seconds, so the smoke run's share is visible.
- ideas/s: knob ideas proposed by the real ideator (`propose`) for fresh, explore and exploit
  generations against a search history of `--history` measured ideas.
Falls back to `synthetic` when the named environment does not exist yet, and says so.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from groundloop import events as ev
from groundloop.execution.environment import Environment
from groundloop.ideator.history import SearchHistory
from groundloop.ideator.service import IdeatorDeps, propose
from groundloop.implementer.service import ImplementerDeps, handle
from groundloop.llm.client import ClientCache, LLMSettings

REPO_ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> Environment:
    if (REPO_ROOT / "environments" / name / "manifest.toml").is_file():
        return Environment.load(name)
    print(f"note: environment {name} does not exist yet; using synthetic", file=sys.stderr)
    return Environment.load("synthetic")


def started_for(env: Environment) -> ev.SearchStarted:
    return ev.SearchStarted(
        search_id="bench",
        producer="bench",
        environment=env.name,
        environment_digest=env.digest(),
        strategy="evolution",
        config=ev.SearchConfig(generations=10, ideas_per_generation=50),
        proposer=ev.ProposerSettings(kind="knobs"),
        implementer=ev.ImplementerSettings(kind="knobs"),
        seed=1,
    )


def ideator_deps(history: SearchHistory, env: Environment) -> IdeatorDeps:
    return IdeatorDeps(history=history, environment=lambda _n: env, llm=ClientCache(LLMSettings()))


def bench_patches(env: Environment, count: int) -> None:
    started = started_for(env)
    history = SearchHistory.from_events("bench", [started])
    gen = ev.GenerationAdvanced(
        search_id="bench", producer="bench", generation=0, plan=ev.GenerationPlan(fresh=count)
    )
    ideas = propose(gen, ideator_deps(history, env)).events
    with tempfile.TemporaryDirectory() as tmp:
        deps = ImplementerDeps(
            search=lambda _s: started,
            environment=lambda _n: env,
            llm=ClientCache(LLMSettings()),
            work_dir=Path(tmp) / "work",
            cache_dir=Path(tmp) / "cache",
        )
        handle(ideas[0], deps)  # warm-up: prepare step, imports, page cache
        checks: dict[str, list[float]] = {}
        seconds: list[float] = []
        for idea in ideas:
            begin = time.perf_counter()
            [out] = handle(idea, deps)
            took = time.perf_counter() - begin
            if isinstance(out, ev.PatchReady):
                seconds.append(took)
                for check in out.preflight.checks:
                    checks.setdefault(check.name, []).append(check.seconds)
            else:
                print(f"  patch failed: {out.stage}: {out.last_error[:200]}", file=sys.stderr)
    if not seconds:
        print(f"[{env.name}] no patch passed pre-flight")
        return
    total = sum(seconds)
    print(
        f"[{env.name}] knob patches applied + pre-flighted: {len(seconds)}/{len(ideas)} in "
        f"{total:.2f} s = {len(seconds) / total:.3f} patches/s ({total / len(seconds) * 1000:.0f} ms each)"
    )
    for name, values in checks.items():
        print(f"    {name:<10} mean {statistics.fmean(values) * 1000:8.1f} ms")
    other = total / len(seconds) - sum(statistics.fmean(v) for v in checks.values())
    print(f"    {'apply+copy':<10} mean {other * 1000:8.1f} ms (normalise, materialise, digests)")


def measured_history(env: Environment, size: int) -> SearchHistory:
    """A history of `size` knob ideas with scores, as a long search would have."""
    started = started_for(env)
    history = SearchHistory.from_events("bench", [started])
    rng = random.Random(0)
    for generation in range(max(size // 50, 1)):
        gen = ev.GenerationAdvanced(
            search_id="bench",
            producer="bench",
            generation=generation,
            plan=ev.GenerationPlan(fresh=min(50, size)),
        )
        for idea in propose(gen, ideator_deps(history, env)).events:
            history.apply(idea)
            history.apply(
                ev.RunCompleted(
                    search_id="bench",
                    producer="bench",
                    run_id=idea.idea_id,
                    idea_id=idea.idea_id,
                    generation=generation,
                    status="succeeded",
                    score=rng.random(),
                    reward=rng.random(),
                    seed=0,
                )
            )
    return history


def bench_ideas(env: Environment, count: int, history_size: int) -> None:
    history = measured_history(env, history_size)
    ids = [r.idea_id for r in history.proposed()]
    top = [r.idea_id for r in history.ranked()[:100]]
    plans = {
        "fresh": ev.GenerationPlan(fresh=count),
        "explore": ev.GenerationPlan(explore=count, explore_context_ids=ids[-100:]),
        "exploit": ev.GenerationPlan(exploit=count, exploit_context_ids=top),
    }
    for mode, plan in plans.items():
        gen = ev.GenerationAdvanced(search_id="bench", producer="bench", generation=99, plan=plan)
        begin = time.perf_counter()
        result = propose(gen, ideator_deps(history, env))
        elapsed = time.perf_counter() - begin
        print(
            f"[{env.name}] knob ideas proposed ({mode:<7}, history {len(ids)}): {len(result.events)} in "
            f"{elapsed:.2f} s = {len(result.events) / elapsed:,.0f} ideas/s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--environment", default="tinygpt")
    parser.add_argument("--patches", type=int, default=12)
    parser.add_argument("--ideas", type=int, default=400)
    parser.add_argument("--history", type=int, default=300)
    args = parser.parse_args()
    env = load(args.environment)
    bench_patches(env, args.patches)
    bench_ideas(env, args.ideas, args.history)


if __name__ == "__main__":
    main()
