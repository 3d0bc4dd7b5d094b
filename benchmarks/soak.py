"""Many searches at once, for minutes: the soak. Every role is a process of its own
(`python -m groundloop.<role>`: evolver, ideator, implementer, the api's projector, `--runners`
runners of `--slots` slots) on a nats-server of its own with authentication. `--searches`
knob-proposer searches on a copy of `synthetic` (runs sleep `--run-seconds`) run at once: for
`--minutes`, each one that ends is replaced by a new one; then the last ones finish.

    .venv/bin/python benchmarks/soak.py [--searches 10] [--minutes 10] [--runners 3]
        [--slots 2] [--run-seconds 0.5] [--generations 2] [--ideas 3] [--json FILE] [--keep]

Checked (failures printed, exit status 1): every search completed; per search every idea has
one PatchReady or PatchFailed, every patch one search RunCompleted, every requested run one
RunCompleted; no event id twice, no entry that is not an event, no dead letter, nothing
quarantined; every event projected; every service process alive. Measured: each service's and
the broker's VmRSS every few seconds, by minute from warm-up (the first search completed) to
the load's end; p50/p99 in the load's first and last third of the search durations, of the
dispatch latency (PatchReady or RunRequested stored -> the run's first RunStarted stored; with
every slot busy mostly the queue's wait, hence also given for the runs asked for with a slot
free and no run waiting) and of the publish lag (an event's occurred_at -> stored).
tests/test_soak.py runs a short variant in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.pipeline import copy_environment  # noqa: E402
from groundloop import events as ev  # noqa: E402
from groundloop.broker import NatsServer, free_port  # noqa: E402
from groundloop.bus import Bus  # noqa: E402
from groundloop.execution.environment import Environment  # noqa: E402
from groundloop.settings import Settings  # noqa: E402
from tests.factories import search_started_in  # noqa: E402
from tests.fleet import (  # noqa: E402
    Fleet,
    exactly_once_failures,
    memory_summary,
    projected_event_ids,
    resident_kb,
    settings_for,
)

ROLES = {
    "evolver": ["-m", "groundloop.evolver"],
    "ideator": ["-m", "groundloop.ideator"],
    "implementer": ["-m", "groundloop.implementer"],
    "projector": ["-m", "groundloop.api", "--no-http"],
    "runner": ["-m", "groundloop.runner", "--resource-class", "cpu"],
}


@dataclass
class SoakOptions:
    searches: int = 10  # kept running at once
    load_s: float = 600.0  # how long completed searches are replaced
    runners: int = 3
    slots: int = 2
    run_seconds: float = 0.5
    generations: int = 2
    ideas: int = 3
    sample_s: float = 5.0  # between two RSS samples
    stall_s: float = 240.0  # no search ending for this long fails the soak
    min_searches: int = 0  # searches started in all, however long that takes (CI)


@dataclass
class Soak:
    """What one soak saw: searches by id (start and end, seconds since the load began), RSS
    samples (seconds, process, kB), processes that died, the times of the load's phases."""

    options: SoakOptions
    started: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    rss: list[tuple[float, str, int]] = field(default_factory=list)
    died: dict[str, int] = field(default_factory=dict)
    epoch: float = 0.0  # wall-clock time of the load's start
    warm_s: float | None = None  # the first SearchCompleted
    load_end_s: float = 0.0
    drained_s: float = 0.0
    stalled: str | None = None  # why the soak stopped waiting for the searches

    def now(self) -> float:
        return time.time() - self.epoch


async def sample_memory(soak: Soak, fleet: Fleet, broker_pid: int | None, stop: asyncio.Event):
    """Every `sample_s`: every service's (and the broker's) RSS; a service that ended is noted."""
    broker = {"nats-server": broker_pid} if broker_pid is not None else {}
    while not stop.is_set():
        t = round(soak.now(), 1)
        for name, kb in {**fleet.resident_kb(), **resident_kb(broker)}.items():
            soak.rss.append((t, name, kb))
        soak.died.update(fleet.exited())
        try:
            await asyncio.wait_for(stop.wait(), soak.options.sample_s)
        except TimeoutError:
            pass


def search_event(env: Environment, search_id: str, seed: int, o: SoakOptions) -> ev.SearchStarted:
    # The deadline only guards against a lost result: every generation closes when its last
    # result arrives, long before it.
    return search_started_in(
        env,
        search_id,
        seed,
        generations=o.generations,
        ideas_per_generation=o.ideas,
        baseline_seeds=1,
        final_top_k=1,
        final_seeds=1,
        generation_deadline_s=3600.0,
    )


async def keep_searches_running(soak: Soak, bus: Bus, env: Environment, fleet: Fleet) -> None:
    """Start `searches` searches; for `load_s` (and until `min_searches` have started) start
    another whenever one ends; then wait for the last ones. A SearchCompleted or SearchStopped
    is heard on an ordered consumer of the log (gap-free: a missed message is fetched again)."""
    o, ended = soak.options, asyncio.Queue[tuple[str, bool]]()

    async def on_end(msg) -> None:
        ended.put_nowait((msg.subject.split(".")[1], msg.subject.split(".")[2] == "SearchStopped"))

    subs = [
        await bus.js.subscribe(bus.subject_filter(type=kind), cb=on_end, ordered_consumer=True)
        for kind in ("SearchCompleted", "SearchStopped")
    ]

    async def start_one() -> None:
        n = len(soak.started)
        search_id = f"soak-{n:04d}"
        soak.started[search_id] = soak.now()
        await bus.publish(search_event(env, search_id, n, o))

    try:
        for _ in range(o.searches):
            await start_one()
        while len(soak.ended) < len(soak.started):
            try:
                search_id, stopped = await asyncio.wait_for(ended.get(), o.stall_s)
            except TimeoutError:
                soak.stalled = f"no search ended in {o.stall_s:.0f} s:\n{fleet.tails()}"
                break
            if search_id in soak.ended or search_id not in soak.started:
                continue
            soak.ended[search_id] = soak.now()
            if stopped:
                soak.stopped.append(search_id)
            if soak.warm_s is None:
                soak.warm_s = soak.ended[search_id]
            if soak.now() < o.load_s or len(soak.started) < o.min_searches:
                await start_one()
            elif not soak.load_end_s:
                soak.load_end_s = soak.now()
        soak.load_end_s = soak.load_end_s or soak.now()
        soak.drained_s = soak.now()
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def log_failures(
    bus: Bus, settings: Settings, soak: Soak
) -> tuple[list[str], list[ev.Event], dict[str, float]]:
    """The checks of the whole log (see the module's docstring), the log itself, and when the
    broker stored each event (by id: the stream's own time, the same clock for every event)."""
    failures: list[str] = []
    log: list[ev.Event] = []
    stored_at: dict[str, float] = {}
    async for msg in bus.stored_messages():
        seq, headers = msg.metadata.sequence.stream, msg.headers or {}
        if isinstance(entry := await bus.read(msg.subject, msg.data, seq, headers), ev.Event):
            log.append(entry)
            stored_at[entry.event_id] = msg.metadata.timestamp.timestamp()
    stored = (await bus.stream_state())["messages"]
    if stored != len(log):
        failures.append(f"{stored - len(log)} log entries are not events")
    failures += exactly_once_failures(log, set(soak.started))
    missing = sorted(set(soak.started) - set(soak.ended))
    if missing:
        failures.append(f"searches never completed: {missing}")
    if soak.stopped:
        failures.append(f"searches stopped: {soak.stopped}")
    if soak.stalled:
        failures.append(soak.stalled)
    dead = (await bus.js.stream_info(settings.dlq_stream)).state.messages
    if dead:
        failures.append(f"{dead} dead letters on {settings.dlq_stream}")
    quarantined = await bus.quarantined()
    if quarantined:
        failures.append(f"{len(quarantined)} entries quarantined: {quarantined[:3]}")
    ids = {e.event_id for e in log}
    deadline = time.monotonic() + 60
    while not ids <= (projected := projected_event_ids(settings)):
        if time.monotonic() > deadline:
            failures.append(f"the projector never projected {len(ids - projected)} events")
            break
        await asyncio.sleep(0.5)
    return failures, log, stored_at


@dataclass
class Dispatch:
    asked_s: float  # when the run was asked for, seconds since the load began
    delay_s: float  # until its first RunStarted
    idle: bool  # when asked for: fewer runs in flight than slots and none waiting before it


def dispatch_latencies(
    log: list[ev.Event], stored_at: dict[str, float], epoch: float, slots: int
) -> list[Dispatch]:
    """Every run's dispatch, by the times the broker stored the events: a search run is asked
    for by its PatchReady, the others by a RunRequested; it is dispatched at its first
    RunStarted. With every slot busy, or runs asked for earlier still waiting, the delay is
    mostly the queue's; `idle` marks the runs that had neither."""
    requested = {r.run_id: r.event_id for r in log if isinstance(r, ev.RunRequested)}
    ready = {p.patch_id: p.event_id for p in log if isinstance(p, ev.PatchReady)}
    runs: dict[str, tuple[float, float]] = {}  # run -> (asked, started)
    ends: list[float] = []
    for e in log:
        if isinstance(e, ev.RunStarted) and e.run_id not in runs:
            cause = requested.get(e.run_id) or ready.get(e.patch_id or "")
            if cause is not None:
                runs[e.run_id] = (stored_at[cause], stored_at[e.event_id])
        elif isinstance(e, ev.RunCompleted):
            ends.append(stored_at[e.event_id])
    asked = sorted(a for a, _ in runs.values())
    starts, ends = sorted(s for _, s in runs.values()), sorted(ends)
    out = []
    for at, started in runs.values():
        busy = bisect.bisect_right(starts, at) - bisect.bisect_right(ends, at)
        waiting = bisect.bisect_left(asked, at) - bisect.bisect_right(starts, at)
        out.append(Dispatch(at - epoch, started - at, busy < slots and waiting <= 0))
    return out


def latency_summary(values: list[float]) -> dict[str, float]:
    """Count, median and 99th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": 0.0, "p99": 0.0}
    p99 = ordered[max(0, -(-99 * len(ordered) // 100) - 1)]
    return {"n": len(ordered), "p50": statistics.median(ordered), "p99": p99}


async def soak(
    settings: Settings, options: SoakOptions, logs: Path, broker_pid: int | None = None
) -> dict:
    """Run the soak on `settings` (its broker served, its environments dir holding the
    synthetic copy) and return its figures, `failures` among them (empty: every check held)."""
    env = Environment.load("synthetic", settings.environments_dir)
    commands = {**ROLES, "runner": [*ROLES["runner"], "--slots", str(options.slots)]}
    fleet = Fleet(settings, logs, commands)
    record = Soak(options)
    bus = await Bus.connect(settings, "soak")
    stop_sampling = asyncio.Event()
    try:
        record.epoch = time.time()
        fleet.start_all({"evolver": 1, "ideator": 1, "implementer": 1, "projector": 1})
        fleet.start_all({"runner": options.runners})
        sampler = asyncio.create_task(sample_memory(record, fleet, broker_pid, stop_sampling))
        await keep_searches_running(record, bus, env, fleet)
        failures, log, stored_at = await log_failures(bus, settings, record)
        stop_sampling.set()
        await sampler
        record.died.update(fleet.exited())
        if record.died:
            failures.append(f"service processes ended: {record.died}\n{fleet.tails()}")
    finally:
        stop_sampling.set()
        fleet.stop()
        await bus.close()
    return figures(record, log, stored_at, failures)


def figures(
    record: Soak, log: list[ev.Event], stored_at: dict[str, float], failures: list[str]
) -> dict:
    o = record.options
    third = record.load_end_s / 3

    def by_third(values: list[tuple[float, float]]) -> dict[str, dict[str, float]]:
        """Summaries of the values whose time falls in the first and in the last third."""
        return {
            "first_third": latency_summary([v for t, v in values if t < third]),
            "last_third": latency_summary([v for t, v in values if t >= 2 * third]),
        }

    dispatches = dispatch_latencies(log, stored_at, record.epoch, o.runners * o.slots)
    # From an event's creation by its producer (its occurred_at) to the broker storing it.
    lags = [
        (stored_at[e.event_id] - record.epoch, stored_at[e.event_id] - e.occurred_at.timestamp())
        for e in log
    ]
    return {
        "options": asdict(o),
        "searches_started": len(record.started),
        "searches_completed": len(record.ended) - len(record.stopped),
        "events": len(log),
        "runs": sum(isinstance(e, ev.RunCompleted) for e in log),
        "warm_s": record.warm_s,
        "load_s": record.load_end_s,
        "wall_s": record.drained_s,
        "search_seconds": by_third(
            [(t, record.ended[s] - t) for s, t in record.started.items() if s in record.ended]
        ),
        "dispatch_seconds": by_third([(d.asked_s, d.delay_s) for d in dispatches]),
        "dispatch_seconds_idle": by_third([(d.asked_s, d.delay_s) for d in dispatches if d.idle]),
        "publish_lag_seconds": by_third(lags),
        "rss_kb": memory_summary(record.rss, record.warm_s or 0.0, record.load_end_s),
        "failures": failures,
    }


def show(r: dict) -> None:
    o = r["options"]
    print(
        f"soak: {o['searches']} searches at once for {r['load_s']:.0f} s ({r['wall_s']:.0f} s "
        f"with the last ones), {o['runners']} runners x {o['slots']} slots, "
        f"{o['generations']} generations x {o['ideas']} ideas, {o['run_seconds']:g}-s runs\n"
        f"  searches completed : {r['searches_completed']} of {r['searches_started']}; "
        f"{r['events']} events, {r['runs']} runs; warm after {r['warm_s'] or 0:.1f} s"
    )
    labels = {
        "search_seconds": "search seconds",
        "dispatch_seconds": "dispatch seconds",
        "dispatch_seconds_idle": "  with no queue",
        "publish_lag_seconds": "event made->stored",
    }
    for key, label in labels.items():
        a, b = r[key]["first_third"], r[key]["last_third"]
        print(
            f"  {label:19}: first third p50 {a['p50']:.2f} p99 {a['p99']:.2f} "
            f"(n={a['n']})  last third p50 {b['p50']:.2f} p99 {b['p99']:.2f} (n={b['n']})"
        )
    print("  RSS (MiB)          : first sample, start median -> end median (growth), peak")
    for name, m in r["rss_kb"].items():
        print(
            f"    {name:18}: {m['first'] / 1024:7.1f}, {m['start'] / 1024:7.1f} -> "
            f"{m['end'] / 1024:7.1f} ({(m['end'] - m['start']) / 1024:+.1f}, "
            f"{m['growth']:+.1%}), peak {m['peak'] / 1024:.1f}; by window: "
            + " ".join(f"{kb / 1024:.0f}" for kb in m["trend"])
        )
    print("  checks             : " + ("all held" if not r["failures"] else "FAILED"))
    for failure in r["failures"]:
        print(f"    - {failure}")


async def bench(options: SoakOptions, root: Path) -> dict:
    envs = copy_environment(root, options.run_seconds)
    server = NatsServer(root / "nats", free_port(), credentials=root / "credentials").start()
    try:
        settings = settings_for(server, root, "SOAK", environments_dir=envs)
        return await soak(settings, options, root / "logs", server.pid)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--searches", type=int, default=10, help="searches running at once")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to keep them up")
    parser.add_argument("--runners", type=int, default=3, help="runner replicas")
    parser.add_argument("--slots", type=int, default=2, help="slots of each runner")
    parser.add_argument("--run-seconds", type=float, default=0.5, help="each run's sleep")
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--ideas", type=int, default=3, help="ideas per generation")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args()
    options = SoakOptions(
        load_s=args.minutes * 60,
        **{k: v for k, v in vars(args).items() if k not in ("minutes", "json", "keep")},
    )
    root = Path(tempfile.mkdtemp(prefix="gl-soak-"))
    try:
        result = asyncio.run(bench(options, root))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    show(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
