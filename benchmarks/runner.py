"""Runner benchmark: dispatch latency, utilisation under a backlog, scaling with replicas.

    .venv/bin/python benchmarks/runner.py [--latency-runs 40] [--util-backlog 8]
        [--util-slots 4] [--util-seconds 10] [--scale 1,4,16,64] [--scale-seconds 5]
        [--scale-waves 2] [--sandbox-runs 30] [--sandbox-burst 64] [--parent-mb 150]

Starts its own nats-server (temporary store) and runs the real runner service (replicas are
asyncio tasks of this one process, each with its own NATS connection and durable-consumer
share) on a copy of the synthetic environment. Patches are real diffs that set SLEEP_SECONDS.

- dispatch latency: PatchReady published → RunStarted received, one idle replica, one run at a
  time (RunStarted is emitted after the workspace is materialised, before the process starts);
- utilisation: a backlog of `util-backlog` runs of `util-seconds` on `util-slots` slots;
  the fraction of slot time spent running environment code (sum of RunCompleted.wall_seconds
  over slots × makespan, from the first RunStarted to the last RunCompleted);
- scaling: R replicas × 1 slot each, R × waves runs of `scale-seconds` (sharing one follower
  of the search's log, as R replica processes would each have one; `--own-log-index`: R
  followers stacked in this one process); throughput as a
  fraction of ideal (R / scale-seconds runs per second), with where the rest went: how long
  the first wave took to start, how long runs took beyond their sleep (process start-up in
  the sandbox), this process's CPU per run (every replica's orchestration);
- sandbox overhead (`--sandbox-runs N`, no broker needed): `python -c pass` N times through
  run_sandboxed as a plain process group and inside bubblewrap (with a resident-memory
  cgroup), from a process grown to `--parent-mb` (a search job's size): wall time and this
  process's CPU per run; `--sandbox-burst N`: N runs started at once from N threads (a wave
  of N replicas), how long after their 2-s sleep the last one is done.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from groundloop import events as ev  # noqa: E402
from groundloop.broker import NatsServer, free_port  # noqa: E402
from groundloop.bus import Bus  # noqa: E402
from groundloop.execution.applier import make_diff  # noqa: E402
from groundloop.execution.environment import Environment  # noqa: E402
from groundloop.runner.service import run  # noqa: E402
from groundloop.runner.slots import RunnerSettings  # noqa: E402
from groundloop.search_index import LogIndex  # noqa: E402
from groundloop.settings import Settings  # noqa: E402
from tests import factories  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


class Watch:
    """Receipt times of RunStarted / RunCompleted per run id (a core subscription)."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.completed: dict[str, ev.RunCompleted] = {}
        self.completed_at: dict[str, float] = {}
        self.changed = asyncio.Event()

    async def start(self, bus: Bus) -> None:
        async def on_msg(msg) -> None:
            now = time.perf_counter()
            event = ev.decode(msg.data)
            if isinstance(event, ev.RunStarted):
                self.started.setdefault(event.run_id, now)
            elif isinstance(event, ev.RunCompleted):
                self.completed.setdefault(event.run_id, event)
                self.completed_at.setdefault(event.run_id, now)
            self.changed.set()

        await bus.nc.subscribe(f"{bus.settings.subject_prefix}.*.RunStarted.>", cb=on_msg)
        await bus.nc.subscribe(f"{bus.settings.subject_prefix}.*.RunCompleted.>", cb=on_msg)

    async def until(self, predicate, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not predicate():
            self.changed.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError("benchmark runs did not finish in time")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass


def patch(env: Environment, search_id: str, index: int, sleep: float) -> ev.PatchReady:
    before = env.editable_sources()
    config = re.sub(r"(?m)^SLEEP_SECONDS = .*$", f"SLEEP_SECONDS = {sleep}", before["config.py"])
    diff = make_diff(before, {**before, "config.py": config})
    return factories.patch_for(
        search_id, index, environment=env.name, environment_digest=env.digest(), diff=diff,
        seed=index,
    )  # fmt: skip


async def publish_prefix(bus: Bus, env: Environment, event: ev.PatchReady) -> None:
    """What a runner requires before a patch (groundloop.search_index): its search's
    SearchStarted and its idea's IdeaProposed (stable ids: stored once per search / idea)."""
    await bus.publish(factories.search_started_in(env, event.search_id))
    idea = factories.idea_proposed(event.search_id, idea_id=event.idea_id, knobs={})
    await bus.publish(idea.model_copy(update={"event_id": ev.stable_id(event.idea_id, "idea")}))


async def replicas(
    settings: Settings, count: int, slots: int, index: LogIndex | None = None
) -> tuple[asyncio.Event, list[asyncio.Task]]:
    """`count` replicas as tasks of this process; with `index`, sharing one follower of each
    search's log (as one replica per process has one) instead of `count` in this process."""
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            run(settings, RunnerSettings(slots=slots, runner_id=f"r{i}"), stop, index)
        )
        for i in range(count)
    ]
    await asyncio.sleep(1.0)  # connections and consumer binding; not part of any measurement
    return stop, tasks


async def stop_all(stop: asyncio.Event, tasks: list[asyncio.Task]) -> None:
    stop.set()
    await asyncio.gather(*tasks)


def scoped(base: Settings, tag: str) -> Settings:
    return base.model_copy(
        update={
            "stream": f"B_{tag}",
            "dlq_stream": f"BD_{tag}",
            "subject_prefix": f"b{tag.lower()}",
            "artifacts_bucket": f"bart_{tag.lower()}",
        }
    )


async def dispatch_latency(base: Settings, env: Environment, runs: int) -> None:
    settings = scoped(base, "LAT")
    bus = await Bus.connect(settings, "bench")
    watch = Watch()
    await watch.start(bus)
    stop, tasks = await replicas(settings, 1, 1)
    latencies = []
    for i in range(runs):
        event = patch(env, "lat", i, 0.0)
        run_id = ev.stable_id(event.patch_id, event.seed)
        await publish_prefix(bus, env, event)
        sent = time.perf_counter()
        await bus.publish(event)
        await watch.until(lambda run_id=run_id: run_id in watch.completed, 60)
        latencies.append(watch.started[run_id] - sent)
    await stop_all(stop, tasks)
    await bus.close()
    ms = sorted(x * 1000 for x in latencies[1:])  # the first pays for loading the environment
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    print(
        f"dispatch latency PatchReady->RunStarted, idle runner, {len(ms)} runs: "
        f"p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms "
        f"(target p50 <= 50 ms, p99 <= 250 ms)"
    )


async def utilisation(
    base: Settings, env: Environment, backlog: int, slots: int, seconds: float
) -> None:
    settings = scoped(base, "UTIL")
    bus = await Bus.connect(settings, "bench")
    watch = Watch()
    await watch.start(bus)
    for i in range(backlog):
        event = patch(env, "util", i, seconds)
        await publish_prefix(bus, env, event)
        await bus.publish(event)
    stop, tasks = await replicas(settings, 1, slots)
    await watch.until(lambda: len(watch.completed) >= backlog, backlog / slots * seconds * 3 + 60)
    await stop_all(stop, tasks)
    await bus.close()
    span = max(watch.completed_at.values()) - min(watch.started.values())
    busy = sum(e.wall_seconds for e in watch.completed.values())
    statuses = {e.status for e in watch.completed.values()}
    ideal = -(-backlog // slots) * seconds
    print(
        f"utilisation, backlog {backlog} x {seconds:g}-s runs on {slots} slots: "
        f"{busy / (slots * span):.1%} of slot time in environment code "
        f"(makespan {span:.1f} s, ideal {ideal:.0f} s; statuses {sorted(statuses)}; target >= 97%)"
    )


async def scaling(
    base: Settings,
    env: Environment,
    counts: list[int],
    seconds: float,
    waves: int,
    own_index: bool,
) -> None:
    print(
        f"scaling: R replicas x 1 slot, asyncio tasks in this one process (each its own NATS "
        f"connection; {'each its own' if own_index else 'one shared'} follower of the search's "
        f"log), {waves} x R runs of {seconds:g} s each"
    )
    for count in counts:
        settings = scoped(base, f"SCALE{count}")
        bus = await Bus.connect(settings, "bench")
        watch = Watch()
        await watch.start(bus)
        stop, tasks = await replicas(settings, count, 1, None if own_index else LogIndex(bus))
        total = count * waves
        events = [patch(env, f"scale{count}", i, seconds) for i in range(total)]
        for event in events:  # the log prefix each patch needs, before the clock starts
            await publish_prefix(bus, env, event)
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        for event in events:
            await bus.publish(event)
        await watch.until(lambda w=watch, n=total: len(w.completed) >= n, waves * seconds * 6 + 120)
        elapsed, cpu = max(watch.completed_at.values()) - t0, cpu_seconds() - cpu0
        await stop_all(stop, tasks)
        await bus.close()
        throughput, ideal = total / elapsed, count / seconds
        failed = sum(e.status != "succeeded" for e in watch.completed.values())
        first_wave = sorted(watch.started.values())[:count]
        in_run = statistics.mean(e.wall_seconds for e in watch.completed.values()) - seconds
        print(
            f"  {count:3d} replicas: {throughput:6.2f} runs/s, ideal {ideal:6.2f} -> "
            f"{throughput / ideal:6.1%} of ideal ({elapsed:.1f} s, {failed} not succeeded); "
            f"first wave started within {first_wave[-1] - t0:.2f} s; runs {in_run:.2f} s over "
            f"their sleep on average; this process {cpu / total * 1000:.0f} ms CPU per run"
        )


def cpu_seconds() -> float:
    """This process's CPU seconds (every replica: they are tasks of this process)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sandbox_overhead(runs: int, burst: int, parent_mb: int) -> None:
    from groundloop.execution.bubblewrap import bwrap_error, host_protections
    from groundloop.execution.sandbox import Limits, allowed_environment, run_sandboxed

    started = time.perf_counter()
    protections = host_protections()
    print(f"sandbox: host probe (once per process) {(time.perf_counter() - started) * 1000:.0f} ms")
    # A supervisor as big as a search job's (~150 MB resident): what a fork of it would copy.
    ballast = [bytearray(b"\1" * (1 << 20)) for _ in range(parent_mb)]
    variants = {"plain process group": Limits(isolate=False)}
    if bwrap_error() is None:
        variants["bwrap + memory cgroup"] = Limits(
            isolate=True, resident_memory_bytes=1 << 30, max_processes=512
        )
    else:
        print(f"sandbox: bwrap not measured: {bwrap_error()}")
    with tempfile.TemporaryDirectory(prefix="groundloop-bench-sandbox-") as tmp:
        work = Path(tmp)
        env = allowed_environment({}, work)

        def one(limits: Limits, code: str = "pass") -> None:
            result = run_sandboxed(
                [sys.executable, "-c", code], cwd=work, env=env, wall_seconds=60, limits=limits
            )
            assert result.returncode == 0, result.output_tail

        for name, limits in variants.items() if runs else ():  # --sandbox-burst alone: none
            one(limits)  # the first run of a process pays for its probes
            times, cpus = [], []
            for _ in range(runs):
                t0, cpu0 = time.perf_counter(), cpu_seconds()
                one(limits)
                times.append((time.perf_counter() - t0) * 1000)
                cpus.append((cpu_seconds() - cpu0) * 1000)
            times.sort()
            p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
            print(
                f"sandbox overhead, {name}, {runs} runs of `python -c pass` from a "
                f"{parent_mb} MB process: p50 {statistics.median(times):.1f} ms, p95 {p95:.1f} ms; "
                f"this process's CPU p50 {statistics.median(cpus):.2f} ms per run"
            )
        if burst:
            limits = list(variants.values())[-1]
            threads = [
                threading.Thread(target=one, args=(limits, "import time; time.sleep(2)"))
                for _ in range(burst)
            ]
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            span, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            print(
                f"sandbox burst, {burst} runs of a 2-s sleep started at once: done after "
                f"{span:.2f} s (+{span - 2:.2f} s), this process's CPU {cpu / burst * 1000:.1f} ms "
                "per run"
            )
    del ballast
    print(f"sandbox protections here: {protections}")


async def main(args: argparse.Namespace) -> None:
    if args.sandbox_runs or args.sandbox_burst:
        sandbox_overhead(args.sandbox_runs, args.sandbox_burst, args.parent_mb)
    with tempfile.TemporaryDirectory(prefix="groundloop-bench-") as tmp:
        root = Path(tmp)
        envs = root / "envs"
        shutil.copytree(
            REPO_ROOT / "environments" / "synthetic",
            envs / "synthetic",
            ignore=shutil.ignore_patterns("__pycache__", "out"),
        )
        env = Environment.load("synthetic", envs)
        server = NatsServer(root / "nats", free_port()).start()
        try:
            base = Settings(
                nats_url=server.url, data_dir=root / "data", environments_dir=envs, ack_wait_s=30.0
            )
            print(f"machine: {sys.platform}, python {sys.version.split()[0]}")
            if args.latency_runs:
                await dispatch_latency(base, env, args.latency_runs)
            if args.util_backlog:
                await utilisation(base, env, args.util_backlog, args.util_slots, args.util_seconds)
            sizes = [int(x) for x in args.scale.split(",") if x.strip() and int(x) > 0]
            if sizes:  # "--scale 0" or "" measures no scaling
                await scaling(
                    base,
                    env,
                    sizes,
                    args.scale_seconds,
                    args.scale_waves,
                    args.own_log_index,
                )
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--latency-runs", type=int, default=40)
    parser.add_argument("--util-backlog", type=int, default=8)
    parser.add_argument("--util-slots", type=int, default=4)
    parser.add_argument("--util-seconds", type=float, default=10.0)
    parser.add_argument("--scale", default="1,4,16,64")
    parser.add_argument("--scale-seconds", type=float, default=5.0)
    parser.add_argument("--scale-waves", type=int, default=2)
    parser.add_argument(
        "--own-log-index",
        action="store_true",
        help="each replica follows the search's log itself (R followers in this one process)",
    )
    parser.add_argument("--sandbox-runs", type=int, default=30)
    parser.add_argument("--sandbox-burst", type=int, default=0)
    parser.add_argument("--parent-mb", type=int, default=150)
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main(parser.parse_args()))
