"""The paper's §4.3 comparison: evolutionary search vs best-of-N at an equal run budget, with
the offline knob proposer, several search seeds each. Prints the best score per generation
for both strategies (and their mean over seeds); asserts nothing.

    python benchmarks/search.py [--env tinygpt] [--generations 3] [--ideas 4] [--seeds 0 1 2] [--slots 1]

Each search runs the whole stack in this process against its own embedded nats-server and
SQLite file under a temporary directory: baseline, generations, final re-evaluation.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlmodel import Session  # noqa: E402

from groundloop import events as ev  # noqa: E402
from groundloop.api.store import SearchRow, make_engine  # noqa: E402
from groundloop.broker import EmbeddedBroker, free_port  # noqa: E402
from groundloop.cli.report import best_so_far  # noqa: E402
from groundloop.cli.search_job import default_deadline, run_search, search_started_event  # noqa: E402
from groundloop.execution.environment import Environment  # noqa: E402
from groundloop.settings import Settings  # noqa: E402


def one_search(
    env: Environment, strategy: str, seed: int, args: argparse.Namespace
) -> tuple[list, SearchRow, float]:
    root = Path(tempfile.mkdtemp(prefix=f"gl-search-{strategy}-{seed}-"))
    settings = Settings(data_dir=root, db_url=f"sqlite:///{root / 'p.db'}")
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
    )
    t = time.perf_counter()
    with EmbeddedBroker(root, free_port()) as broker:
        live = settings.model_copy(update={"nats_url": broker.url})
        asyncio.run(run_search(live, started, env, slots=args.slots, report_dir=root / "reports"))
    engine = make_engine(settings.resolved_db_url())
    with Session(engine) as session:
        curve = best_so_far(session, started.search_id)
        row = session.get(SearchRow, started.search_id)
    return curve, row, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="tinygpt")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--ideas", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--final-seeds", type=int, default=2)
    args = parser.parse_args()
    env = Environment.load(args.env)
    print(
        f"{env.name}: {args.generations} generations x {args.ideas} ideas, knob proposer, "
        f"seeds {args.seeds}; metric {env.manifest.metric.name} ({env.manifest.metric.direction})"
    )
    curves: dict[str, list[list[float]]] = {}
    for strategy in ("evolution", "best_of_n"):
        for seed in args.seeds:
            curve, row, seconds = one_search(env, strategy, seed, args)
            best = [p.mean_score for p in curve]
            curves.setdefault(strategy, []).append(best)
            print(
                f"{strategy:>10} seed {seed}: best so far per generation "
                f"{' '.join(f'{s:.4f}' for s in best)} | baseline {row.baseline_score} | "
                f"{row.completion_reason} | {seconds:.0f}s",
                flush=True,
            )
    for strategy, runs in curves.items():
        width = min(len(r) for r in runs)
        means = [statistics.mean(r[g] for r in runs) for g in range(width)]
        print(f"{strategy:>10} mean over seeds: {' '.join(f'{m:.4f}' for m in means)}")


if __name__ == "__main__":
    main()
