"""Environment benchmark: baseline wall time and metric over seeds, plus nanogpt on one GPU.

    .venv/bin/python benchmarks/environments.py [--envs tinygpt,tinygrpo] [--seeds 3]
        [--cache-dir DIR] [--nanogpt-seconds 120] [--skip-nanogpt]

For each CPU environment: the unpatched baseline, run by the real run protocol
(groundloop.execution.environment.execute: sandbox, full budget, protected evaluation) once per seed.
Prints per run the training and evaluation wall time, the CPU time of both (children's
rusage), the metric and the load average (the machine may be shared: compare CPU time, not
only wall time), then the metric's mean ± std and the wall-time range. tinygrpo also reports
its one-off prepare time and the base policy's accuracy (the same evaluation with 0 GRPO steps).

nanogpt (when CUDA is available and environments/nanogpt exists): its 1-GPU variant for a
short budget (NANOGPT_TRAIN_SECONDS), on FineWeb shards when NANOGPT_DATA_DIR is set, else on
its synthetic tokens (throughput only); prints tokens/s from its log and the evaluated loss.
Otherwise says it was skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment, execute

REPO_ROOT = Path(__file__).resolve().parent.parent

ENVIRONMENTS = REPO_ROOT / "environments"


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(
    env: Environment, scratch: Path, cache: Path, seed: int, diff: str | None = None
) -> dict:
    made = env.materialize(scratch / "ws", diff)
    load_before = os.getloadavg()[0]
    cpu_before = children_cpu_seconds()
    result = execute(env, made.path, seed=seed, run_dir=scratch / "run", cache_dir=cache)
    return {
        "seed": seed,
        "status": result.outcome.status,
        "reason": (result.outcome.reason or "")[-300:],
        "score": result.outcome.score,
        "train_s": result.train.wall_seconds,
        "eval_s": result.evaluate.wall_seconds if result.evaluate else 0.0,
        "cpu_s": children_cpu_seconds() - cpu_before,
        "load": (load_before + os.getloadavg()[0]) / 2,
    }


def print_run(name: str, row: dict) -> None:
    score = f"{row['score']:.4f}" if row["score"] is not None else row["status"]
    print(
        f"  {name:9s} seed {row['seed']}: {score:>9s}  train {row['train_s']:5.1f}s  "
        f"eval {row['eval_s']:4.1f}s  cpu {row['cpu_s']:5.1f}s  load {row['load']:.1f}",
        flush=True,
    )
    if row["status"] != "succeeded":
        print(f"    {row['status']}: {row['reason']}", flush=True)


def summarise(name: str, metric: str, rows: list[dict]) -> None:
    scores = [r["score"] for r in rows if r["score"] is not None]
    walls = [r["train_s"] + r["eval_s"] for r in rows]
    spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
    mean = f"{statistics.mean(scores):.4f} ± {spread:.4f}" if scores else "n/a"
    print(
        f"{name}: {metric} {mean} over {len(scores)}/{len(rows)} seeds; run wall "
        f"{min(walls):.1f}-{max(walls):.1f}s (train {statistics.mean(r['train_s'] for r in rows):.1f}s "
        f"mean), cpu {statistics.mean(r['cpu_s'] for r in rows):.1f}s mean",
        flush=True,
    )


def bench_cpu_env(name: str, seeds: int, cache: Path) -> None:
    env = Environment.load(name, ENVIRONMENTS)
    print(
        f"== {name} (budget {env.manifest.budget.wall_seconds:g}s wall, metric "
        f"{env.manifest.metric.name}, {env.manifest.metric.direction})",
        flush=True,
    )
    if env.manifest.prepare:
        started = time.perf_counter()
        env.prepare(cache)
        print(f"  prepare: {time.perf_counter() - started:.1f}s (0 if already cached)", flush=True)
    if name == "tinygrpo":
        source = env.editable_sources()["train.py"]
        no_steps = make_diff(
            {"train.py": source},
            {"train.py": re.sub(r"^STEPS = \d+", "STEPS = 0", source, flags=re.M)},
        )
        with tempfile.TemporaryDirectory() as scratch:
            row = run_once(env, Path(scratch), cache, 0, no_steps)
        print(f"  base policy (0 GRPO steps): accuracy {row['score']}", flush=True)
    rows = []
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as scratch:
            rows.append(run_once(env, Path(scratch), cache, seed))
        print_run(name, rows[-1])
    summarise(name, env.manifest.metric.name, rows)


def bench_nanogpt(seconds: int) -> None:
    root = ENVIRONMENTS / "nanogpt"
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda or not (root / "train.py").is_file():
        why = "no CUDA device" if not cuda else "environments/nanogpt is missing"
        print(f"== nanogpt 1-GPU: skipped ({why})", flush=True)
        return
    env = Environment.load("nanogpt", ENVIRONMENTS)
    with tempfile.TemporaryDirectory() as scratch:
        work = env.materialize(Path(scratch) / "ws").path
        extra = {
            "GROUNDLOOP_DEVICE": "cuda",
            "GROUNDLOOP_SEED": "0",
            "CUDA_VISIBLE_DEVICES": "0",
            "NANOGPT_TRAIN_SECONDS": str(seconds),
            "GROUNDLOOP_METRICS_OUT": str(Path(scratch) / "metrics.json"),
        }
        data = "FineWeb shards" if os.environ.get("NANOGPT_DATA_DIR") else "synthetic tokens"
        if data == "synthetic tokens":
            extra["NANOGPT_SYNTHETIC_DATA"] = "1"
        child_env = {**os.environ, **extra}
        started = time.perf_counter()
        train = subprocess.run(
            [sys.executable, "train.py"],
            cwd=work,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=seconds + 900,
        )
        train_s = time.perf_counter() - started
        rates = re.findall(r"([\d,.]+)\s*tok(?:ens)?/s", train.stdout + train.stderr)
        if train.returncode != 0:
            print(
                f"== nanogpt 1-GPU: training failed (exit {train.returncode})\n{(train.stdout + train.stderr)[-2000:]}"
            )
            return
        subprocess.run(
            [sys.executable, "evaluate.py"], cwd=work, env=child_env, timeout=1800, check=False
        )
        metrics_path = Path(extra["GROUNDLOOP_METRICS_OUT"])
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        print(
            f"== nanogpt 1-GPU ({data}, {seconds}s budget): train {train_s:.0f}s, last logged "
            f"{rates[-1] if rates else '?'} tokens/s, val_loss {metrics.get('val_loss', metrics)}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", default="tinygpt,tinygrpo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: a temporary directory"
    )
    parser.add_argument("--nanogpt-seconds", type=int, default=120)
    parser.add_argument("--skip-nanogpt", action="store_true")
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as default_cache:
        cache_root = args.cache_dir or Path(default_cache)
        for name in filter(None, args.envs.split(",")):
            bench_cpu_env(name, args.seeds, cache_root / name)
    if not args.skip_nanogpt:
        bench_nanogpt(args.nanogpt_seconds)


if __name__ == "__main__":
    main()
