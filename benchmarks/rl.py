"""The paper's RL measurement at this scale: GRPO on the ideator policy from execution reward.

For each search seed, two RL searches on the same environment and budget, side by side:
plain GRPO (the paper's) and GRPO with the novelty bonus (reward + bonus × dissimilarity to
the search's earlier ideas). Every policy step is a real generation: the policy samples a
group, the ideas are patched, pre-flighted and run in the sandbox, and their rewards train it.
Prints, per variant and seed: the group's mean reward at step 0 and over the last 5 steps,
the max reward at step 0 and overall, the distinct-idea fraction at step 0 and over the last
5 steps, steps flagged as collapsed, and the wall time; then the means over seeds.
Asserts nothing.

    python benchmarks/rl.py [--env synthetic] [--steps 30] [--group 8] [--seeds 0 1 2]
                            [--novelty 0.3] [--variants plain novelty]
    python benchmarks/rl.py --env tinygpt --steps 2 --group 2 --seeds 0 --variants plain

Each search runs the whole stack in this process against its own embedded nats-server and
SQLite file under a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlmodel import Session  # noqa: E402

from groundloop import events as ev  # noqa: E402
from groundloop.api.store import make_engine  # noqa: E402
from groundloop.broker import EmbeddedBroker, free_port  # noqa: E402
from groundloop.cli.report_rl import policy_rows  # noqa: E402
from groundloop.cli.search_job import default_deadline, run_search, search_started_event  # noqa: E402
from groundloop.execution.environment import Environment  # noqa: E402
from groundloop.settings import Settings  # noqa: E402


@dataclass(frozen=True)
class Curve:
    variant: str
    seed: int
    mean: list[float]
    best: list[float]
    distinct: list[float]
    collapsed: int
    seconds: float


def one_search(env: Environment, variant: str, seed: int, args: argparse.Namespace) -> Curve:
    root = Path(tempfile.mkdtemp(prefix=f"gl-rl-{variant}-{seed}-"))
    settings = Settings(data_dir=root, db_url=f"sqlite:///{root / 'p.db'}")
    rl = ev.RLSettings(novelty_bonus=args.novelty if variant == "novelty" else 0.0)
    started = search_started_event(
        f"{env.name}-rl-{variant}-s{seed}",
        env,
        strategy="rl",
        generations=args.steps,
        ideas=args.group,
        seed=seed,
        model=None,
        implementer_model=None,
        baseline_seeds=1,
        final_top_k=1,
        final_seeds=1,
        budgets=ev.Budgets(),
        deadline=default_deadline(env, args.group, args.slots),
        rl=rl,
    )
    t = time.perf_counter()
    with EmbeddedBroker(root, free_port()) as broker:
        live = settings.model_copy(update={"nats_url": broker.url})
        asyncio.run(run_search(live, started, env, slots=args.slots, report_dir=root / "reports"))
    seconds = time.perf_counter() - t
    engine = make_engine(settings.resolved_db_url())
    with Session(engine) as session:
        steps = policy_rows(session, started.search_id)
    engine.dispose()
    return Curve(
        variant,
        seed,
        [s.mean_reward for s in steps],
        [s.max_reward for s in steps],
        [s.distinct_fraction or 0.0 for s in steps],
        sum(1 for s in steps if s.collapsed),
        seconds,
    )


def _tail(values: list[float], k: int = 5) -> float:
    return statistics.fmean(values[-k:]) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="synthetic")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--novelty", type=float, default=0.3)
    parser.add_argument("--variants", nargs="+", default=["plain", "novelty"])
    args = parser.parse_args()
    env = Environment.load(args.env, Settings().environments_dir)
    print(
        f"{env.name}: {args.steps} policy steps × group {args.group}, seeds {args.seeds}, "
        f"novelty bonus {args.novelty}"
    )
    header = (
        "variant  seed  mean@0  mean@last5  max@0  max(all)  distinct@0  distinct@last5  "
        "collapsed  seconds"
    )
    print(header)
    curves: list[Curve] = []
    for seed in args.seeds:
        for variant in args.variants:
            c = one_search(env, variant, seed, args)
            curves.append(c)
            print(
                f"{variant:8} {seed:4}  {c.mean[0]:.4f}  {_tail(c.mean):.4f}      "
                f"{c.best[0]:.4f}  {max(c.best):.4f}    {c.distinct[0]:.3f}       "
                f"{_tail(c.distinct):.3f}           {c.collapsed:3}  {c.seconds:7.1f}",
                flush=True,
            )
    print("\nmeans over seeds")
    for variant in args.variants:
        group = [c for c in curves if c.variant == variant]
        print(
            f"{variant:8} mean reward {statistics.fmean(c.mean[0] for c in group):.4f} → "
            f"{statistics.fmean(_tail(c.mean) for c in group):.4f}; "
            f"max reward {statistics.fmean(c.best[0] for c in group):.4f} at step 0, "
            f"{statistics.fmean(max(c.best) for c in group):.4f} best of all steps, "
            f"{statistics.fmean(_tail(c.best) for c in group):.4f} over the last 5; "
            f"distinct {statistics.fmean(c.distinct[0] for c in group):.3f} → "
            f"{statistics.fmean(_tail(c.distinct) for c in group):.3f}; "
            f"collapsed steps {statistics.fmean(c.collapsed for c in group):.1f}"
        )
        per_step = [
            statistics.fmean(c.mean[i] for c in group if i < len(c.mean))
            for i in range(max(len(c.mean) for c in group))
        ]
        print(f"         mean reward per step: {' '.join(f'{v:.3f}' for v in per_step)}")


if __name__ == "__main__":
    main()
