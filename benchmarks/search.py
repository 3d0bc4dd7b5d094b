"""Searches compared at an equal run budget, with the offline knob proposer, several search
seeds each. Prints the best score per generation for each arm (and their mean over seeds),
the final re-evaluated score, wall time and slot utilisation; asserts nothing.

    python benchmarks/search.py [--compare strategies|schedules] [--env tinygpt]
        [--generations 3] [--ideas 4] [--seeds 0 1 2] [--slots 1] [--eval-seconds S]

- strategies: the paper's §4.3 comparison, evolution vs best-of-N;
- schedules: evolution on the generational schedule (the paper's) vs the steady one (the
  next generation opens once half of the current one has results).

Each search runs the whole stack in this process against its own embedded nats-server and
SQLite file under a temporary directory: baseline, generations, final re-evaluation.
`--eval-seconds` (synthetic only) makes every run sleep that long, as a stand-in for
training time. Utilisation = sum of search runs' wall seconds / (slots x span from the
first search RunStarted to the last search RunCompleted).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlmodel import Session  # noqa: E402

from benchmarks.pipeline import copy_environment  # noqa: E402
from groundloop import events as ev  # noqa: E402
from groundloop.api.store import SearchRow, make_engine  # noqa: E402
from groundloop.broker import EmbeddedBroker, free_port  # noqa: E402
from groundloop.bus import Bus  # noqa: E402
from groundloop.cli.report import best_so_far  # noqa: E402
from groundloop.cli.search_job import default_deadline, run_search, search_started_event  # noqa: E402
from groundloop.execution.environment import Environment  # noqa: E402
from groundloop.settings import Settings  # noqa: E402

ARMS = {
    "strategies": (("evolution", "generational"), ("best_of_n", "generational")),
    "schedules": (("evolution", "generational"), ("evolution", "steady")),
}


def utilisation(log: list[ev.Event], slots: int) -> float:
    started = [e.occurred_at for e in log if isinstance(e, ev.RunStarted)]
    done = [e for e in log if isinstance(e, ev.RunCompleted) and e.purpose == "search"]
    if not started or not done:
        return 0.0
    span = (max(e.occurred_at for e in done) - min(started)).total_seconds()
    return sum(e.wall_seconds for e in done) / (slots * span) if span > 0 else 0.0


def one_search(
    env: Environment, strategy: str, schedule: str, seed: int, args: argparse.Namespace
) -> tuple[list, SearchRow, float, float]:
    root = Path(tempfile.mkdtemp(prefix=f"gl-search-{strategy}-{seed}-"))
    settings = Settings(
        data_dir=root, db_url=f"sqlite:///{root / 'p.db'}", environments_dir=env.root.parent
    )
    started = search_started_event(
        f"{env.name}-{strategy.replace('_', '-')}-s{seed}",
        env,
        strategy=strategy,
        generations=args.generations,
        ideas=args.ideas,
        seed=seed,
        model=None,
        implementer_model=None,
        baseline_seeds=1,
        final_top_k=1,
        final_seeds=args.final_seeds,
        budgets=ev.Budgets(),
        deadline=default_deadline(env, args.ideas, args.slots),
        schedule=schedule,
    )
    t = time.perf_counter()
    with EmbeddedBroker(root, free_port()) as broker:
        live = settings.model_copy(update={"nats_url": broker.url})
        asyncio.run(run_search(live, started, env, slots=args.slots, report_dir=root / "reports"))
        seconds = time.perf_counter() - t
        log = asyncio.run(read_log(live, started.search_id))
    engine = make_engine(settings.resolved_db_url())
    with Session(engine) as session:
        curve = best_so_far(session, started.search_id)
        row = session.get(SearchRow, started.search_id)
    shutil.rmtree(root, ignore_errors=True)
    return curve, row, seconds, utilisation(log, args.slots)


async def read_log(settings: Settings, search_id: str) -> list[ev.Event]:
    bus = await Bus.connect(settings, "bench-search")
    try:
        return [e async for e in bus.events(search_id)]
    finally:
        await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--compare", choices=sorted(ARMS), default="strategies")
    parser.add_argument("--env", default="tinygpt")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--ideas", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--final-seeds", type=int, default=2)
    parser.add_argument("--eval-seconds", type=float, help="synthetic only: every run sleeps")
    args = parser.parse_args()
    env = Environment.load(args.env)
    if args.eval_seconds is not None:
        if env.name != "synthetic":
            parser.error("--eval-seconds applies to --env synthetic only")
        copies = Path(tempfile.mkdtemp(prefix="gl-search-envs-"))
        env = Environment.load("synthetic", copy_environment(copies, args.eval_seconds))
    print(
        f"{env.name}: {args.generations} generations x {args.ideas} ideas, knob proposer, "
        f"{args.slots} slots, seeds {args.seeds}; metric {env.manifest.metric.name} "
        f"({env.manifest.metric.direction})"
    )
    arms: dict[str, list[tuple[list[float], float, float, float | None]]] = {}
    for strategy, schedule in ARMS[args.compare]:
        arm = f"{strategy}/{schedule}"
        for seed in args.seeds:
            curve, row, seconds, used = one_search(env, strategy, schedule, seed, args)
            best = [p.mean_score for p in curve]
            arms.setdefault(arm, []).append((best, seconds, used, row.best_score))
            print(
                f"{arm:>24} seed {seed}: best so far per generation "
                f"{' '.join(f'{s:.4f}' for s in best)} | final {row.best_score} | baseline "
                f"{row.baseline_score} | {row.completion_reason} | {seconds:.1f} s | "
                f"utilisation {used:.1%}",
                flush=True,
            )
    for arm, runs in arms.items():
        width = min(len(best) for best, *_ in runs)
        means = [statistics.mean(best[g] for best, *_ in runs) for g in range(width)]
        finals = [final for *_, final in runs if final is not None]
        print(
            f"{arm:>24} mean over seeds: {' '.join(f'{m:.4f}' for m in means)} | final "
            f"{statistics.mean(finals) if finals else float('nan'):.4f} | "
            f"{statistics.median(s for _, s, _, _ in runs):.1f} s median | utilisation "
            f"{statistics.mean(u for _, _, u, _ in runs):.1%} mean"
        )


if __name__ == "__main__":
    main()
