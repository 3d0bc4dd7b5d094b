"""Replay: the log is the truth; projections are rebuilt from it at will.

`rebuild` drops every projection table, replays the whole stream in publish order and folds
it again, so the tables come out identical to the live ones (every timestamp in them comes
from events, never the clock). It is safe to interrupt and re-run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from groundloop.bus import Bus
from groundloop.settings import Settings
from groundloop.store import make_engine, reset_tables


@dataclass(frozen=True)
class RebuildReport:
    events: int
    applied: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


async def rebuild(settings: Settings, batch_size: int = 1000) -> RebuildReport:
    """Drop the projections and fold the whole log into fresh tables."""
    from groundloop.api.projector import project_all  # the read side owns the fold

    engine = make_engine(settings.resolved_db_url())
    reset_tables(engine)
    bus = await Bus.connect(settings, "replay")
    started = time.perf_counter()
    seen = applied = 0
    batch: list = []
    # Fold batch k in a worker thread while batch k+1 is read and decoded (one in flight,
    # so the fold order is the log order).
    folding: asyncio.Future | None = None
    try:
        async for pair in bus.raw_events(batch=batch_size):  # (stream seq, event)
            batch.append(pair)
            if len(batch) >= batch_size:
                applied += await folding if folding is not None else 0
                folding = asyncio.ensure_future(asyncio.to_thread(project_all, engine, batch, batch_size))
                seen, batch = seen + len(batch), []
        applied += await folding if folding is not None else 0
        applied += project_all(engine, batch, batch_size)
        seen += len(batch)
    finally:
        await bus.close()
        engine.dispose()
    return RebuildReport(seen, applied, time.perf_counter() - started)
