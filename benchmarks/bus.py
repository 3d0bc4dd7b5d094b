"""Bus throughput on this machine: publish (sequential acked, batched), consume+ack through the
service loop, ordered replay, and projection rebuild. Prints numbers; asserts nothing.

    python benchmarks/bus.py [--events 100000]

Starts its own nats-server (temporary store) and SQLite file; events are realistic: whole
searches (SearchStarted, GenerationAdvanced, IdeaProposed with ~400-char ideas, PatchReady
with a diff, RunStarted, RunCompleted with provenance, SearchCompleted).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from groundloop.api.rebuild import rebuild  # noqa: E402
from groundloop.broker import NatsServer, free_port  # noqa: E402
from groundloop.bus import Bus  # noqa: E402
from groundloop.consumer import consume  # noqa: E402
from groundloop.events import encode  # noqa: E402
from groundloop.settings import Settings  # noqa: E402
from tests.factories import one_search  # noqa: E402


def make_events(n: int) -> list:
    out, i = [], 0
    while len(out) < n:
        out += one_search(f"bench{i}", ideas=10)
        i += 1
    return out[:n]


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>9,.0f} events/s  ({n:,} in {seconds:.2f}s)"


async def main(n: int, window: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gl-bench-"))
    server = NatsServer(tmp / "nats", free_port()).start()
    settings = Settings(nats_url=server.url, data_dir=tmp, db_url=f"sqlite:///{tmp / 'p.db'}")
    events = make_events(n)
    size = sum(len(encode(e)) for e in events) / n
    print(f"{n:,} events, mean {size:,.0f} bytes; nats-server {server.url}")
    bus = await Bus.connect(settings, "bench")
    try:
        half = n // 2
        t = time.perf_counter()
        for e in events[:half]:
            await bus.publish(e)
        print("publish, sequential acked :", rate(half, time.perf_counter() - t))

        t = time.perf_counter()
        for start in range(half, n, window):
            await asyncio.gather(*(bus.publish(e) for e in events[start : start + window]))
        print(f"publish, batched ({window:>4})   :", rate(n - half, time.perf_counter() - t))

        done, stop = 0, asyncio.Event()

        async def count(event, delivery):
            nonlocal done
            done += 1
            if done == n:
                stop.set()
            return []

        t = time.perf_counter()
        await consume(bus, "bench", [bus.subject_filter()], count, stop=stop, concurrency=64)
        print("consume+ack (service loop):", rate(n, time.perf_counter() - t))

        t = time.perf_counter()
        replayed = sum([1 async for _ in bus.events()])
        print("ordered replay (decoded)  :", rate(replayed, time.perf_counter() - t))

        del events  # a rebuild runs in a process of its own: don't make its GC walk our copy
        gc.collect()
        report = await rebuild(settings)
        print("projection rebuild        :", rate(report.events, report.seconds))
    finally:
        await bus.close()
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=256, help="publishes in flight when batched")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.window))
