"""Projection rebuild throughput: how fast `groundloop replay rebuild` folds a realistic log into
SQLite, next to the raw replay it is built on. Prints numbers; asserts nothing.

    python benchmarks/projection.py [--events 60000] [--repeat 3] [--batch-size 1000] [--no-check]

Starts its own nats-server (temporary store) and SQLite files. The log is many searches as
they are written (tests/search_story.py): SearchStarted, baseline RunRequested/RunStarted/
RunCompleted, GenerationAdvanced, IdeaProposed, PatchReady or PatchFailed, runs that succeed
or time out, PolicyUpdated, the final re-evaluation, SearchCompleted; searches differ in size.
Measured, `--repeat` times each (then the median):
  raw replay  Bus.raw_events: fetch and decode every entry, nothing else;
  rebuild     groundloop.api.rebuild.rebuild, the code of `replay rebuild`: the fold into a
              scratch SQLite file (the rate it reports) and the swap into the target file.
Then (unless --no-check) the log is folded again one event per transaction through the live
projector's `apply`, and the two databases' tables are compared: row counts and a digest per
table, and whether they are equal.

    python benchmarks/projection.py --live [--events 20000] [--repeat 3]

measures the live projector alone instead: the log is read from the stream once, then folded
`--repeat` times into a fresh SQLite file, one event per transaction through `apply` with a
Session per event, as the projector service does (no bus, no worker thread); each fold's
tables are compared with the batched fold's (`project_all`) of the same entries.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlmodel import Session  # noqa: E402

from groundloop.api.projector import apply, project_all  # noqa: E402
from groundloop.api.rebuild import rebuild  # noqa: E402
from groundloop.api.store import make_engine, reset_tables, table_snapshot  # noqa: E402
from groundloop.broker import NatsServer, free_port  # noqa: E402
from groundloop.bus import Bus  # noqa: E402
from groundloop.events import Event, encode  # noqa: E402
from groundloop.settings import Settings  # noqa: E402
from tests.search_story import search_story  # noqa: E402


def make_log(n: int) -> list[Event]:
    """Whole searches of varied sizes (never cut short) until there are at least `n` events."""
    rng = random.Random(15)
    out: list[Event] = []
    while len(out) < n:
        out += search_story(
            f"bench{len(out)}",
            generations=rng.randint(2, 6),
            ideas_per_generation=rng.randint(4, 16),
            seed=rng.randrange(100),
        )
    return out


def rate(n: int, seconds: float, cpu: float | None = None) -> str:
    """Events per second of wall time; with `cpu` (this process's CPU seconds, nats-server's
    not included), CPU microseconds per event too: steadier than wall time on a busy machine."""
    text = f"{n / seconds:>9,.0f} events/s  ({n:,} in {seconds:.2f}s"
    return text + (f", {cpu / n * 1e6:.0f} us CPU/event)" if cpu is not None else ")")


async def publish(bus: Bus, events: list[Event], window: int = 256) -> None:
    for start in range(0, len(events), window):
        await asyncio.gather(*(bus.publish(e) for e in events[start : start + window]))


async def raw_replay(bus: Bus, batch: int) -> tuple[int, float, float]:
    """(events, wall seconds, CPU seconds) of reading and decoding the whole log."""
    started, cpu = time.perf_counter(), time.process_time()
    count = 0
    async for _pair in bus.raw_events(batch=batch):
        count += 1
    return count, time.perf_counter() - started, time.process_time() - cpu


def digest(rows: list[dict]) -> str:
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


async def check(settings: Settings, bus: Bus, root: Path) -> None:
    """Fold the log event by event through the live projector's `apply` (one transaction per
    event) and compare its tables with the rebuilt ones."""
    reference = make_engine(f"sqlite:///{root / 'event-by-event.db'}")
    reset_tables(reference)
    started = time.perf_counter()
    count = 0
    with Session(reference) as session:
        async for seq, event in bus.raw_events():
            apply(session, event, seq=seq)
            count += 1
    print("event-by-event apply      :", rate(count, time.perf_counter() - started))
    rebuilt = make_engine(settings.resolved_db_url())
    expected, got = table_snapshot(reference), table_snapshot(rebuilt)
    for table in sorted(expected):
        print(
            f"  {table:<17} rows {len(got[table]):>7,} rebuilt, {len(expected[table]):>7,} "
            f"event by event; digest {digest(got[table])} / {digest(expected[table])}"
        )
    print("rebuilt tables equal the event-by-event fold:", got == expected)
    reference.dispose()
    rebuilt.dispose()


def live_fold(pairs: list[tuple[int, Event]], path: Path) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds, tables) of folding `pairs` as the live projector does."""
    engine = make_engine(f"sqlite:///{path}")
    reset_tables(engine)
    started, cpu = time.perf_counter(), time.process_time()
    for seq, event in pairs:
        with Session(engine) as session:
            apply(session, event, seq=seq)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    tables = table_snapshot(engine)
    engine.dispose()
    return seconds, cpu, tables


async def measure_live(args: argparse.Namespace, bus: Bus, root: Path) -> None:
    pairs = [pair async for pair in bus.raw_events(batch=args.batch_size)]
    batched = make_engine(f"sqlite:///{root / 'batched.db'}")
    reset_tables(batched)
    project_all(batched, pairs)
    expected = table_snapshot(batched)
    batched.dispose()
    rates, cpus = [], []
    for i in range(args.repeat):
        seconds, cpu, tables = live_fold(pairs, root / f"live{i}.db")
        rates.append(len(pairs) / seconds)
        cpus.append(cpu / len(pairs) * 1e6)
        equal = tables == expected
        print("live apply (one per txn)  :", rate(len(pairs), seconds, cpu), "equal:", equal)
    print(
        f"median of {args.repeat}: live apply {statistics.median(rates):,.0f} events/s, "
        f"{statistics.median(cpus):.0f} us CPU/event"
    )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="gl-bench-projection-") as scratch:
        await measure(args, Path(scratch))


async def measure(args: argparse.Namespace, root: Path) -> None:
    server = NatsServer(root / "nats", free_port()).start()
    settings = Settings(nats_url=server.url, data_dir=root, db_url=f"sqlite:///{root / 'p.db'}")
    bus = await Bus.connect(settings, "bench")
    try:
        events = make_log(args.events)
        searches = len({e.search_id for e in events})
        size = sum(len(encode(e)) for e in events) / len(events)
        print(
            f"{len(events):,} events of {searches} searches, mean {size:,.0f} bytes; "
            f"nats-server {server.url}; batch {args.batch_size}"
        )
        await publish(bus, events)
        del events  # the rebuild's process would not hold the log: neither should we
        gc.collect()
        if args.live:
            await measure_live(args, bus, root)
            return

        replays, rebuilds, totals, cpus = [], [], [], []
        for _ in range(args.repeat):
            count, seconds, cpu = await raw_replay(bus, args.batch_size)
            replays.append(count / seconds)
            print("raw replay (decode only)  :", rate(count, seconds, cpu))
            started, cpu = time.perf_counter(), time.process_time()
            report = await rebuild(settings, batch_size=args.batch_size)
            total, cpu = time.perf_counter() - started, time.process_time() - cpu
            fold_cpu = getattr(report, "cpu_seconds", None)  # (older rebuilds lack it)
            rebuilds.append(report.rate)
            totals.append(report.events / total)
            if fold_cpu is not None:
                cpus.append(fold_cpu / report.events * 1e6)
            print("projection rebuild (fold) :", rate(report.events, report.seconds, fold_cpu))
            print("  with setup and swap     :", rate(report.events, total, cpu))
        fold_cpu_text = f"{statistics.median(cpus):.0f} us CPU/event; " if cpus else ""
        print(
            f"median of {args.repeat}: raw replay {statistics.median(replays):,.0f} events/s, "
            f"rebuild {statistics.median(rebuilds):,.0f} events/s ({fold_cpu_text}"
            f"{statistics.median(totals):,.0f} events/s with setup and swap)"
        )
        if args.check:
            await check(settings, bus, root)
    finally:
        await bus.close()
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1000, help="events per fetch and fold")
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument(
        "--live", action="store_true", help="measure the live projector's apply alone"
    )
    asyncio.run(main(parser.parse_args()))
