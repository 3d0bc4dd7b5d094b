"""`groundloop search`: the main job. Starts (or reuses) the broker, every service, publishes
SearchStarted, shows progress until SearchCompleted, then writes the report folder.

A search that ends without success exits non-zero with its reason: SearchStopped (the model
cannot be reached or is not served: the reason names the URL and the OS error), or a
SearchCompleted that says the search could not run (the environment failed to load, the
baseline failed on every seed), or a role process that died (--role-processes: the error
names the role and shows the tail of its log). Choices (--strategy, --edit-format,
--schedule) are checked before anything starts (exit 2), and the error lists the valid
values or says which combination cannot work (steady with a strategy other than evolution).

Where the roles run (embedded_roles): by default every role is a task of this process; with
--role-processes each runs as a child process of it (role_processes), logging to
<data dir>/searches/<search>/<role>.log.

The default search id is derived from the command (environment, strategy, seed), so running
the same command again after a crash or Ctrl-C resumes that search from its log: SearchStarted
is deduplicated, the evolver rebuilds its state by replay, and completed patches are never run
again (their RunCompleted is in the log, and the runner's consumer has acknowledged them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import Session

from groundloop import events as ev
from groundloop import telemetry
from groundloop.api.store import make_engine
from groundloop.bus import Bus
from groundloop.cli.embedded_roles import (
    ROLE_PROCESSES,
    ROLE_PROCESSES_BY_DEFAULT,
    role_flags,
    role_process_group,
    run_services,
    runner_settings,
    search_roles,
)
from groundloop.cli.gpus import GpuPlan, plan_gpus
from groundloop.cli.progress import console, fetch_logs
from groundloop.cli.report import write_report
from groundloop.cli.rl_options import rl_settings
from groundloop.cli.search_settings import (
    EDIT_FORMATS,
    FAILED_REASONS,
    SearchEndedBadly,
    check_choice,
    check_strategy,
    llm_overrides,
    search_started_event,
)
from groundloop.cli.search_watch import watch_until_ended
from groundloop.execution.environment import Environment
from groundloop.search_request import SCHEDULES
from groundloop.search_request import default_deadline as default_deadline
from groundloop.settings import Settings
from groundloop.telemetry import configure_logging

log = logging.getLogger(__name__)


def default_slots(env: Environment) -> int:
    """CPU runs at once: one core is left to the implementer's pre-flight smoke runs, since
    contention would push runs toward their wall-clock cap (seen: tinygpt with 2 slots on 2
    cores timed out runs that take ~55 s alone). GPU environments: the visible GPUs divided
    by the manifest's GPUs per run (gpus.plan_gpus), or 1 without a local runner."""
    if env.manifest.resource_class != "cpu":
        return 1
    return max(1, ((os.cpu_count() or 1) - 1) // env.manifest.resources.cpus)


async def run_search(
    settings: Settings,
    started: ev.SearchStarted,
    env: Environment,
    *,
    slots: int,
    report_dir: Path,
    with_runner: bool = True,
    llm_settings: object | None = None,
    gpus: GpuPlan | None = None,
    with_trainer: bool = True,
    ui_port: int | None = None,
    role_processes: Collection[str] = (),
) -> Path | None:
    """Run the search to its end; the report folder, or None when interrupted (resumable).
    The roles named in `role_processes` run as child processes (embedded_roles), the others
    as tasks of this process. Raises SearchEndedBadly, after writing the report where there
    is one, when the search stopped (SearchStopped), could not run, or lost a role process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bus = await Bus.connect(settings, "cli")
    recorded = [e async for e in bus.events(started.search_id) if isinstance(e, ev.SearchStarted)]
    if recorded and recorded[0].model_dump(exclude={"occurred_at"}) != started.model_dump(
        exclude={"occurred_at"}
    ):
        console.print(
            f"[yellow]search {started.search_id} exists with other settings; "
            "continuing it as recorded (pass --search-id NAME for a new one)[/]"
        )
    elif recorded:
        console.print(f"resuming search {started.search_id} from its log")
    await bus.publish(started)
    await bus.close()
    plan = {"resource_class": env.manifest.resource_class, "slots": slots, "gpus": gpus}
    with_trainer = with_trainer and started.rl is not None
    roles = search_roles(with_runner=with_runner, with_trainer=with_trainer)
    apart = [role for role in roles if role in role_processes]
    children = role_process_group(
        settings,
        started.search_id,
        stop,
        llm_settings=llm_settings,
        runner_grace_s=runner_settings(**plan).shutdown_grace_s if "runner" in apart else 0.0,
    )
    async with children:  # however this block is left, no role process outlives it
        for role in apart:  # first: their start-up overlaps this process's
            children.start(role, role_flags(role, **plan))
        if apart:
            console.print(f"role processes: {', '.join(apart)} (logs in {children.log_dir})")
        tasks = await run_services(
            settings,
            stop,
            with_runner=with_runner,
            llm_settings=llm_settings,
            with_trainer=with_trainer,
            elsewhere=apart,
            **plan,
        )
        ended = await watch_until_ended(
            settings, started, stop, [*tasks, *children.watchers], children, ui_port
        )
    if ended is None:
        console.print(f"stopped; run the same command again to resume {started.search_id}")
        return None
    reason = ended.completion_reason or ended.status
    if ended.status == "stopped":
        raise SearchEndedBadly(f"search {started.search_id} {reason}")  # "stopped by the …"
    out = report_dir / started.search_id
    engine = make_engine(settings.resolved_db_url())
    with Session(engine) as session:
        write_report(session, started.search_id, out, env.manifest.metric)
    engine.dispose()
    await fetch_logs(settings, started.search_id, out)
    if reason.startswith(FAILED_REASONS):
        raise SearchEndedBadly(f"search {started.search_id} failed: {reason} (report in {out})")
    return out


def register(app: typer.Typer, replay_app: typer.Typer) -> None:
    from groundloop.cli.main import connected_settings, run_async

    @app.command()
    def search(
        env: Annotated[
            str, typer.Option(help="environment name (folder under environments/) or path")
        ] = "tinygpt",
        strategy: Annotated[
            str,
            typer.Option(
                help="evolution | best_of_n | rl (GRPO on a policy: one step per generation) "
                "| hybrid (evolution and policy slots in every generation)"
            ),
        ] = "evolution",
        generations: Annotated[int, typer.Option(help="generations (epochs) of ideas")] = 2,
        ideas: Annotated[int, typer.Option(help="ideas per generation")] = 3,
        seed: Annotated[
            int, typer.Option(help="search seed: decisions are a function of log and seed")
        ] = 0,
        model: Annotated[
            str | None,
            typer.Option(
                help="ideator model, e.g. anthropic:claude-sonnet-4-5; none = offline knob proposer"
            ),
        ] = None,
        implementer_model: Annotated[
            str | None, typer.Option(help="implementer model (default: --model)")
        ] = None,
        ideas_per_call: Annotated[
            int, typer.Option(min=1, help="ideas asked of the ideator model per call (paper: 10)")
        ] = 10,
        samples: Annotated[
            int,
            typer.Option(min=1, help="implementer samples per idea, in parallel (paper: 10)"),
        ] = 2,
        revisions: Annotated[
            int,
            typer.Option(
                min=0, help="revisions per sample after an apply/pre-flight error (paper: <= 2)"
            ),
        ] = 2,
        edit_format: Annotated[
            str | None,
            typer.Option(
                help="diff | search-replace | whole-file (default: whole files for local or "
                "small models, diffs otherwise; the paper's implementer wrote diffs)"
            ),
        ] = None,
        model_concurrency: Annotated[
            int | None,
            typer.Option(
                min=1,
                help="model calls at once per endpoint (default: 1 for a server on this "
                "machine, unlimited otherwise; the paper does not say)",
            ),
        ] = None,
        max_output_tokens: Annotated[
            int | None,
            typer.Option(
                min=1,
                help="output-token cap per model call (default 8192, lowered to what the "
                "model's measured speed fits in the timeout; the paper does not say)",
            ),
        ] = None,
        search_id: Annotated[
            str | None, typer.Option(help="name; default <env>-<strategy>-s<seed>, which resumes")
        ] = None,
        slots: Annotated[
            int | None,
            typer.Option(
                help="runs at once on this machine (default: spare cores / the environment's cpus)"
            ),
        ] = None,
        baseline_seeds: int = 1,
        final_top_k: int = 1,
        final_seeds: int = 2,
        max_runs: Annotated[int | None, typer.Option(help="budget: runs")] = None,
        gpu_hours: Annotated[float | None, typer.Option(help="budget: GPU-hours")] = None,
        dollars: Annotated[float | None, typer.Option(help="budget: model spend in $")] = None,
        deadline: Annotated[
            float | None,
            typer.Option(
                help="seconds before a generation closes anyway (default: from the budget)"
            ),
        ] = None,
        runner: Annotated[
            bool, typer.Option(help="run a local runner (off: use remote runner replicas)")
        ] = True,
        trainer: Annotated[
            bool,
            typer.Option(help="rl/hybrid: run the rl-trainer here (off: a remote one serves it)"),
        ] = True,
        ui: Annotated[
            bool, typer.Option(help="serve the dashboard on 127.0.0.1 while the search runs")
        ] = True,
        ui_port: Annotated[int, typer.Option(help="dashboard port (0: any free port)")] = 8765,
        report_dir: Annotated[Path | None, typer.Option(help="default: <data dir>/reports")] = None,
        price: Annotated[
            list[str] | None,
            typer.Option(
                help="MODEL=IN,OUT: a model's dollars per million input and output tokens "
                "(needed for a hosted model missing from the price table; repeatable)"
            ),
        ] = None,
        rl_policy: Annotated[
            str | None,
            typer.Option(
                help="rl/hybrid policy: none = offline knob language model; hf:<local path>"
            ),
        ] = None,
        rl: Annotated[
            list[str] | None,
            typer.Option(help="rl/hybrid setting KEY=VALUE, e.g. novelty_bonus=0.2 (repeatable)"),
        ] = None,
        schedule: Annotated[
            str,
            typer.Option(
                help="generational (the paper's: generation t+1 opens once every idea of t "
                "has its result) | steady (evolution only: t+1 opens once half of t has "
                "results, so its ideas are written while t's last runs hold the slots)"
            ),
        ] = "generational",
        role_processes: Annotated[
            bool,
            typer.Option(
                help="run the roles as child processes of this command, so the search uses "
                "more than one core (logs in <data dir>/searches/<search>/); off: every role "
                "a task of this process"
            ),
        ] = ROLE_PROCESSES_BY_DEFAULT,
    ) -> None:
        """Run a search end to end and write its report."""
        check_strategy(strategy)
        rl_config = rl_settings(strategy, rl_policy, rl)
        check_choice("--edit-format", edit_format, EDIT_FORMATS)
        check_choice("--schedule", schedule, SCHEDULES)
        settings = Settings()
        configure_logging(
            settings.model_copy(update={"log_level": "WARNING"})
            if sys.stdout.isatty()
            else settings
        )
        try:
            telemetry.configure_tracing(settings, "search")  # every role of this process
        except ValueError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
        environment = Environment.load(env, settings.environments_dir)
        llm_settings = llm_overrides(model, model_concurrency, max_output_tokens, price)
        gpu_plan = plan_gpus(environment, runner)
        slots = slots or (gpu_plan.slots if gpu_plan else default_slots(environment))
        name = search_id or f"{environment.name}-{strategy.replace('_', '-')}-s{seed}"
        try:
            started = search_started_event(
                name,
                environment,
                strategy=strategy,
                generations=generations,
                ideas=ideas,
                seed=seed,
                model=model,
                implementer_model=implementer_model,
                baseline_seeds=baseline_seeds,
                final_top_k=final_top_k,
                final_seeds=final_seeds,
                deadline=deadline
                if deadline is not None
                else default_deadline(environment, ideas, slots),
                budgets=ev.Budgets(max_runs=max_runs, gpu_hours=gpu_hours, dollars=dollars),
                ideas_per_call=ideas_per_call,
                samples=samples,
                revisions=revisions,
                edit_format=edit_format,
                llm_settings=llm_settings,
                rl=rl_config,
                schedule=schedule,
            )
        except ValueError as exc:  # e.g. --schedule steady with a strategy that cannot overlap
            console.print(f"[red]{exc}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        proposer = (
            f"model {model}"
            if model
            else "the offline knob proposer (no model configured; labelled 'knobs')"
        )
        if rl_config is not None:
            policy = rl_config.policy or "the offline knob language model"
            proposer = policy if strategy == "rl" else f"{proposer} and the policy {policy}"
        console.print(f"search [bold]{name}[/] on {environment.name} ({strategy}) with {proposer}")
        result: list[Path | None] = []
        with connected_settings(settings) as s:

            async def go() -> None:
                result.append(
                    await run_search(
                        s,
                        started,
                        environment,
                        slots=slots,
                        report_dir=report_dir or s.data_dir / "reports",
                        with_runner=runner,
                        llm_settings=llm_settings,
                        gpus=gpu_plan,
                        with_trainer=trainer,
                        ui_port=ui_port if ui else None,
                        role_processes=ROLE_PROCESSES if role_processes else (),
                    )
                )

            try:
                run_async(go())
            except SearchEndedBadly as exc:
                console.print(f"[red]{exc}[/]", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            finally:
                telemetry.shutdown_tracing()  # export the last spans before the process exits
        if result and result[0] is not None:
            console.print(f"[green]done[/]: report in {result[0]}")
            print(
                (result[0] / "leaderboard.md").read_text()
            )  # plain: Markdown must not be re-wrapped
