"""What `groundloop search` shows while it runs, read from the projections: a live table on a
terminal, a line at most every five seconds otherwise; and the run logs copied into the report
folder once the search has ended."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table
from sqlalchemy import Engine, case, func
from sqlmodel import Session, col, select

from groundloop.api import ranking
from groundloop.api.store import IdeaRow, PatchRow, RunRow, SearchRow, create_tables, make_engine
from groundloop.api.usage import ModelUsage, model_usage
from groundloop.bus import Bus
from groundloop.settings import Settings

console = Console()


def progress(session: Session, search_id: str) -> tuple[list[tuple[str, str]], SearchRow | None]:
    """The rows of the progress display (label, value) and the search's row, if projected yet.
    Aggregates in the database: it runs every few seconds all search long, so its cost must
    not grow with the Python objects of every run."""
    search = session.get(SearchRow, search_id)
    ideas, patched = idea_counts(session, search_id)
    done, in_flight = session.exec(
        select(
            func.count(col(RunRow.completed_at)),
            func.coalesce(func.sum(case((col(RunRow.status) == "running", 1), else_=0)), 0),
        ).where(RunRow.search_id == search_id)
    ).one()
    # The leader by groundloop.ranking: its mean over search-split runs, final runs excluded.
    best = ranking.leader(session, search_id, include_baseline=False)
    baseline = ranking.search_baseline_scores(session, search_id)
    generation = (
        search.current_generation if search and search.current_generation is not None else None
    )
    return [
        ("search", search_id),
        ("generation", "baseline" if generation is None else str(generation)),
        *shown(ideas, patched, done, in_flight, baseline, best, model_usage(session, search_id)),
    ], search


def idea_counts(session: Session, search_id: str) -> tuple[int, int]:
    """How many ideas the search has, and how many of them were patched."""
    ideas = session.exec(
        select(func.count()).select_from(IdeaRow).where(IdeaRow.search_id == search_id)
    ).one()
    patched = session.exec(
        select(func.count()).select_from(PatchRow).where(PatchRow.search_id == search_id)
    ).one()
    return ideas, patched


def shown(
    ideas: int,
    patched: int,
    done: int,
    in_flight: int,
    baseline: list[float],
    best: ranking.Entry | None,
    usage: ModelUsage,
) -> list[tuple[str, str]]:
    """The display's rows after the search and its generation."""
    tokens = usage.input_tokens + usage.output_tokens
    return [
        ("ideas / patched", f"{ideas} / {patched}"),
        ("runs done / in flight", f"{done} / {in_flight}"),
        ("baseline (search split)", ", ".join(f"{s:.4g}" for s in baseline) or "measuring"),
        (
            "best so far (search split)",
            f"{best.standing.mean_score:.4g} (mean of {best.standing.runs} "
            f"run{'s' if best.standing.runs != 1 else ''}; {(best.idea.title or '')[:60]})"
            if best
            else "-",
        ),
        ("model tokens / cost", f"{tokens:,} / ${usage.cost_usd:.4f}"),
    ]


def _poll(
    engine: Engine, search_id: str, due: bool
) -> tuple[SearchRow | None, bool, list[tuple[str, str]] | None]:
    """The search's row, whether it has ended, and the display's rows if `due` or ended."""
    with Session(engine) as session:
        search = session.get(SearchRow, search_id)
        ended = search is not None and search.status in ("completed", "stopped")
        return search, ended, progress(session, search_id)[0] if due or ended else None


# How often the display is rebuilt: about a dozen aggregate queries (~5 ms at a thousand runs,
# in a worker thread); loading every run twice a second once cost ~6 % of the embedded
# search's CPU. Whether the search has ended is still checked every POLL_S (one primary-key
# read).
POLL_S = 0.5
LIVE_REFRESH_S = 2.0
PRINT_EVERY_S = 5.0


async def watch(
    settings: Settings, search_id: str, stop: asyncio.Event, tasks: list[asyncio.Task]
) -> SearchRow | None:
    """Show progress until the search completes or stops (its row), `stop` is set or a
    service dies."""
    engine = make_engine(settings.resolved_db_url())
    create_tables(engine)
    interactive = sys.stdout.isatty()
    last_line, last_shown = "", -math.inf
    with (
        Live(console=console, refresh_per_second=2, transient=False)
        if interactive
        else contextlib.nullcontext() as live
    ):
        while not stop.is_set():
            for task in tasks:
                if task.done():
                    exc = task.exception()
                    raise RuntimeError(f"a service stopped unexpectedly: {exc!r}") from exc
            due = time.monotonic() - last_shown >= (
                LIVE_REFRESH_S if live is not None else PRINT_EVERY_S
            )
            # In a thread with its own session: every role of the embedded search shares this
            # event loop, and the queries would stall them all while they run.
            search, ended, pairs = await asyncio.to_thread(_poll, engine, search_id, due)
            if pairs is not None:
                last_shown = time.monotonic()
                if live is not None:
                    table = Table(show_header=False, box=None)
                    for label, value in pairs:
                        table.add_row(label, value)
                    live.update(table)
                else:
                    line = " | ".join(f"{label}: {value}" for label, value in pairs)
                    if line != last_line:
                        print(line, flush=True)
                        last_line = line
            if ended:
                engine.dispose()
                return search
            await asyncio.sleep(POLL_S)
    engine.dispose()
    return None


async def fetch_logs(settings: Settings, search_id: str, out_dir: Path, top: int = 5) -> None:
    """Copy the logs of the first baseline run and of the best search-split run of each of
    the `top` leaderboard ideas (the runs the report's leaderboard links to) into
    out_dir/logs; a log that cannot be read is left out rather than failing the report."""
    from groundloop.runner.logs import read_log

    engine = make_engine(settings.resolved_db_url())
    with Session(engine) as session:
        runs = session.exec(
            select(RunRow)
            .where(RunRow.search_id == search_id, col(RunRow.log_key).is_not(None))
            .order_by(col(RunRow.completed_at), RunRow.run_id)
        ).all()
        leaders = {e.standing.best_run_id for e in ranking.leaderboard(session, search_id)[:top]}
    engine.dispose()
    wanted = [r for r in runs if r.purpose == "baseline"][:1] + [
        r for r in runs if r.run_id in leaders
    ]
    bus = await Bus.connect(settings, "cli-report")
    try:
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
        for run in wanted:
            if run.log_key is None:  # the query excludes these; narrows the type
                continue
            with contextlib.suppress(Exception):
                (out_dir / "logs" / f"{run.run_id}.log").write_bytes(
                    await read_log(bus.get_artifact, run.log_key)
                )
    finally:
        await bus.close()
