"""`groundloop search`: the main job. Starts (or reuses) the broker, every service, publishes
SearchStarted, shows progress until SearchCompleted, then writes the report folder.

The default search id is derived from the command (environment, strategy, seed), so running
the same command again after a crash or Ctrl-C resumes that search from its log: SearchStarted
is deduplicated, the evolver rebuilds its state by replay, and completed patches are never run
again (their RunCompleted is in the log, and the runner's consumer has acknowledged them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from sqlalchemy import func
from sqlmodel import Session, select

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.execution.environment import Environment
from groundloop.cli.report import write_report
from groundloop.settings import Settings
from groundloop.api.store import IdeaRow, PatchRow, RunRow, SearchRow, create_tables, make_engine
from groundloop.telemetry import configure_logging

log = logging.getLogger(__name__)
console = Console()


def search_started_event(search_id: str, env: Environment, *, strategy: str, generations: int,
                         ideas: int, seed: int, model: str | None, implementer_model: str | None,
                         baseline_seeds: int, final_top_k: int, final_seeds: int,
                         budgets: ev.Budgets, deadline: float | None) -> ev.SearchStarted:
    proposer = ev.ProposerSettings(kind="llm", model=model) if model else ev.ProposerSettings(kind="knobs")
    implementer = (ev.ImplementerSettings(kind="llm", model=implementer_model or model) if model
                   else ev.ImplementerSettings(kind="knobs"))
    prices: dict[str, ev.ModelPrice] = {}
    if model:  # the table in force is part of the record, so costs can be audited later
        from groundloop.llm.client import LLMSettings, price_table

        prices = price_table(LLMSettings())
    return ev.SearchStarted(
        event_id=ev.stable_id(search_id, "SearchStarted"),
        search_id=search_id, producer="cli", environment=env.name,
        environment_digest=env.digest(), strategy=strategy,  # type: ignore[arg-type]
        config=ev.SearchConfig(
            generations=generations, ideas_per_generation=ideas, baseline_seeds=baseline_seeds,
            final_top_k=final_top_k, final_seeds=final_seeds, generation_deadline_s=deadline,
            budgets=budgets,
        ),
        proposer=proposer, implementer=implementer, price_table=prices, seed=seed,
    )


def default_slots(env: Environment) -> int:
    """CPU runs at once: one core is left to the implementer's pre-flight smoke runs, since
    contention would push runs toward their wall-clock cap (seen: tinygpt with 2 slots on 2
    cores timed out runs that take ~55 s alone). GPU environments: 1 (more GPU runners are
    separate replicas: `python -m groundloop.runner --gpus ...`)."""
    if env.manifest.resource_class != "cpu":
        return 1
    return max(1, ((os.cpu_count() or 1) - 1) // env.manifest.resources.cpus)


def default_deadline(env: Environment, ideas: int, slots: int) -> float:
    """A generation closes after this long even if some idea never became terminal (an
    ideator that wrote fewer ideas than planned, a lost message): three times the time its
    runs and pre-flights need back to back, and at least ten minutes."""
    budget = env.manifest.budget
    per_idea = budget.wall_seconds + budget.grace_seconds + budget.eval_seconds + budget.smoke_seconds
    return max(600.0, 3.0 * per_idea * ideas / max(slots, 1))


async def run_services(settings: Settings, stop: asyncio.Event, *, resource_class: str,
                       slots: int, with_runner: bool = True) -> list[asyncio.Task]:
    """Every service as a task of this process; they still talk only through NATS."""
    from groundloop.api.service import run as projector
    from groundloop.evolver.service import run as evolver
    from groundloop.ideator.service import run as ideator
    from groundloop.implementer.service import run as implementer
    from groundloop.runner.service import run as runner
    from groundloop.runner.slots import RunnerSettings

    coros = [projector(settings, stop), evolver(settings, stop), ideator(settings, stop),
             implementer(settings, stop)]
    if with_runner:
        coros.append(runner(settings, RunnerSettings(resource_class=resource_class, slots=slots), stop))
    return [asyncio.create_task(c) for c in coros]


def progress(session: Session, search_id: str) -> tuple[list[tuple[str, str]], SearchRow | None]:
    search = session.get(SearchRow, search_id)
    ideas = session.exec(select(func.count()).select_from(IdeaRow).where(IdeaRow.search_id == search_id)).one()
    patched = session.exec(select(func.count()).select_from(PatchRow).where(PatchRow.search_id == search_id)).one()
    runs = session.exec(select(RunRow).where(RunRow.search_id == search_id)).all()
    cost = session.exec(select(func.sum(IdeaRow.cost_usd + IdeaRow.patch_failed_cost_usd))
                        .where(IdeaRow.search_id == search_id)).one() or 0.0
    cost += session.exec(select(func.sum(PatchRow.cost_usd)).where(PatchRow.search_id == search_id)).one() or 0.0
    best = session.exec(select(IdeaRow).where(IdeaRow.search_id == search_id, IdeaRow.best_reward.is_not(None))
                        .order_by(IdeaRow.best_reward.desc())).first()
    done = [r for r in runs if r.completed_at is not None]
    baseline = [r.score for r in done if r.purpose == "baseline" and r.score is not None]
    generation = search.current_generation if search and search.current_generation is not None else None
    return [
        ("search", search_id),
        ("generation", "baseline" if generation is None else str(generation)),
        ("ideas / patched", f"{ideas} / {patched}"),
        ("runs done / in flight", f"{len(done)} / {sum(1 for r in runs if r.status == 'running')}"),
        ("baseline", ", ".join(f"{s:.4g}" for s in baseline) or "measuring"),
        ("best so far", f"{best.best_score:.4g} ({(best.title or '')[:60]})" if best and best.best_score is not None else "-"),
        ("cost", f"${cost:.4f}"),
    ], search


async def watch(settings: Settings, search_id: str, stop: asyncio.Event, tasks: list[asyncio.Task]) -> bool:
    """Show progress until the search completes, `stop` is set, or a service dies."""
    engine = make_engine(settings.resolved_db_url())
    create_tables(engine)
    interactive = sys.stdout.isatty()
    last_line, last_print = "", 0.0
    with Live(console=console, refresh_per_second=2, transient=False) if interactive else contextlib.nullcontext() as live:
        while not stop.is_set():
            for task in tasks:
                if task.done():
                    exc = task.exception()
                    raise RuntimeError(f"a service stopped unexpectedly: {exc!r}") from exc
            with Session(engine) as session:
                pairs, search = progress(session, search_id)
            if live is not None:
                table = Table(show_header=False, box=None)
                for label, value in pairs:
                    table.add_row(label, value)
                live.update(table)
            else:
                line = " | ".join(f"{label}: {value}" for label, value in pairs)
                if line != last_line and time.monotonic() - last_print > 5:
                    print(line, flush=True)
                    last_line, last_print = line, time.monotonic()
            if search is not None and search.status == "completed":
                return True
            await asyncio.sleep(0.5)
    engine.dispose()
    return False


async def fetch_logs(settings: Settings, search_id: str, out_dir: Path, top: int = 5) -> None:
    from groundloop.runner.logs import read_log

    engine = make_engine(settings.resolved_db_url())
    with Session(engine) as session:
        runs = session.exec(select(RunRow).where(RunRow.search_id == search_id, RunRow.log_key.is_not(None))
                            .order_by(RunRow.reward.desc())).all()
    engine.dispose()
    wanted = [r for r in runs if r.purpose == "baseline"][:1] + [r for r in runs if r.purpose != "baseline"][:top]
    bus = await Bus.connect(settings, "cli-report")
    try:
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
        for run in wanted:
            with contextlib.suppress(Exception):
                (out_dir / "logs" / f"{run.run_id}.log").write_bytes(await read_log(bus.get_artifact, run.log_key))
    finally:
        await bus.close()


async def run_search(settings: Settings, started: ev.SearchStarted, env: Environment, *,
                     slots: int, report_dir: Path, with_runner: bool = True) -> Path | None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bus = await Bus.connect(settings, "cli")
    recorded = [e async for e in bus.events(started.search_id) if isinstance(e, ev.SearchStarted)]
    if recorded and recorded[0].model_dump(exclude={"occurred_at"}) != started.model_dump(exclude={"occurred_at"}):
        console.print(f"[yellow]search {started.search_id} exists with other settings; continuing it as recorded "
                      "(pass --search-id NAME for a new one)[/]")
    elif recorded:
        console.print(f"resuming search {started.search_id} from its log")
    await bus.publish(started)
    await bus.close()
    tasks = await run_services(settings, stop, resource_class=env.manifest.resource_class, slots=slots,
                               with_runner=with_runner)
    try:
        completed = await watch(settings, started.search_id, stop, tasks)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    if not completed:
        console.print(f"stopped; run the same command again to resume {started.search_id}")
        return None
    out = report_dir / started.search_id
    engine = make_engine(settings.resolved_db_url())
    with Session(engine) as session:
        write_report(session, started.search_id, out, env.manifest.metric)
    engine.dispose()
    await fetch_logs(settings, started.search_id, out)
    return out


def register(app: typer.Typer, replay_app: typer.Typer) -> None:
    from groundloop.cli.main import connected_settings, run_async

    @app.command()
    def search(
        env: Annotated[str, typer.Option(help="environment name (folder under environments/) or path")] = "tinygpt",
        strategy: Annotated[str, typer.Option(help="evolution | best_of_n")] = "evolution",
        generations: Annotated[int, typer.Option(help="generations (epochs) of ideas")] = 2,
        ideas: Annotated[int, typer.Option(help="ideas per generation")] = 3,
        seed: Annotated[int, typer.Option(help="search seed: decisions are a function of log and seed")] = 0,
        model: Annotated[str | None, typer.Option(help="ideator model, e.g. anthropic:claude-sonnet-4-5; none = offline knob proposer")] = None,
        implementer_model: Annotated[str | None, typer.Option(help="implementer model (default: --model)")] = None,
        search_id: Annotated[str | None, typer.Option(help="name; default <env>-<strategy>-s<seed>, which resumes")] = None,
        slots: Annotated[int | None, typer.Option(help="runs at once on this machine (default: spare cores / the environment's cpus)")] = None,
        baseline_seeds: int = 1,
        final_top_k: int = 1,
        final_seeds: int = 2,
        max_runs: Annotated[int | None, typer.Option(help="budget: runs")] = None,
        gpu_hours: Annotated[float | None, typer.Option(help="budget: GPU-hours")] = None,
        dollars: Annotated[float | None, typer.Option(help="budget: model spend in $")] = None,
        deadline: Annotated[float | None, typer.Option(help="seconds before a generation closes anyway (default: from the budget)")] = None,
        runner: Annotated[bool, typer.Option(help="run a local runner (off: use remote runner replicas)")] = True,
        report_dir: Annotated[Path | None, typer.Option(help="default: <data dir>/reports")] = None,
    ) -> None:
        """Run a search end to end and write its report."""
        settings = Settings()
        configure_logging(settings.model_copy(update={"log_level": "WARNING"}) if sys.stdout.isatty() else settings)
        environment = Environment.load(env, settings.environments_dir)
        slots = slots or default_slots(environment)
        name = search_id or f"{environment.name}-{strategy.replace('_', '-')}-s{seed}"
        started = search_started_event(
            name, environment, strategy=strategy, generations=generations, ideas=ideas, seed=seed,
            model=model, implementer_model=implementer_model, baseline_seeds=baseline_seeds,
            final_top_k=final_top_k, final_seeds=final_seeds,
            deadline=deadline if deadline is not None else default_deadline(environment, ideas, slots),
            budgets=ev.Budgets(max_runs=max_runs, gpu_hours=gpu_hours, dollars=dollars),
        )
        proposer = f"model {model}" if model else "the offline knob proposer (no model configured; labelled 'knobs')"
        console.print(f"search [bold]{name}[/] on {environment.name} ({strategy}) with {proposer}")
        result: list[Path | None] = []
        with connected_settings(settings) as s:
            async def go() -> None:
                result.append(await run_search(s, started, environment, slots=slots,
                                               report_dir=report_dir or s.data_dir / "reports",
                                               with_runner=runner))

            run_async(go())
        if result and result[0] is not None:
            console.print(f"[green]done[/]: report in {result[0]}")
            print((result[0] / "leaderboard.md").read_text())  # plain: Markdown must not be re-wrapped
