"""Where `groundloop search` runs its roles: each one either a task of the search's own
process (`run_services`) or a child process of it (`role_process_group`, through
groundloop.cli.role_processes). Wherever a role runs, it gets the same settings, model
settings and runner plan, and talks to the others only through NATS.

ROLE_PROCESSES is what `--role-processes` moves out of the search's process, chosen by
measurement (benchmarks/pipeline.py --role-processes, on a 2-core machine): see its comment.
Model calls: the per-endpoint limit (LLMSettings.max_concurrency, 1 for a server on this
machine by default) holds per process, so with the ideator and the implementer in different
processes a model server may see up to twice as many calls at once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Collection
from pathlib import Path

from groundloop import events as ev
from groundloop.cli.gpus import GpuPlan
from groundloop.cli.role_processes import RoleProcesses, role_environment
from groundloop.settings import Settings

# Every role of a search, in start order; the runner only with a local runner, the
# rl-trainer only for a search with a policy.
SEARCH_ROLES = ("projector", "evolver", "ideator", "implementer", "runner", "rl-trainer")
# The roles `--role-processes` runs as child processes, and whether it is on by default:
# measured with benchmarks/pipeline.py (400 candidates, 8 slots, no-op runs, 4 runs of each,
# medians) on this project's 2-core machine while other work kept its load at 9-22:
#   knobs: in-process 8.7 candidates/s, 0.043 CPU-s/candidate, 2.1 s to the first one;
#          implementer+runner apart 8.5, 0.043, 4.5 s; every role apart 6.9, 0.059, 7.7 s.
#   llm:   in-process 7.3, 0.063, 4.9 s; implementer+runner apart 5.0, 0.071, 15.8 s;
#          every role apart 4.1, 0.082, 14.0 s.
# Likely why: on cores that are busy anyway, each hop between processes waits for the
# receiving process to be scheduled, where in one process the event loop is already running.
# The split that moves the two roles with the most work of their own (pre-flight smoke runs
# and runs: workspaces, sandboxes) ties at best, so the default stays in-process. The
# rl-trainer was not measured and stays where it was.
ROLE_PROCESSES = ("implementer", "runner")
ROLE_PROCESSES_BY_DEFAULT = False
# After SIGTERM a role finishes the event in hand; beyond the runner's own grace for handing
# back its runs, this long is allowed for closing connections and flushing traces.
STOP_MARGIN_S = 15.0


def search_roles(*, with_runner: bool, with_trainer: bool) -> list[str]:
    skipped = {"runner"} if not with_runner else set()
    if not with_trainer:
        skipped.add("rl-trainer")
    return [role for role in SEARCH_ROLES if role not in skipped]


def check_roles(roles: Collection[str]) -> None:
    unknown = sorted(set(roles) - set(SEARCH_ROLES))
    if unknown:
        raise ValueError(
            f"unknown role(s) {', '.join(unknown)}; the roles are {', '.join(SEARCH_ROLES)}"
        )


async def run_services(
    settings: Settings,
    stop: asyncio.Event,
    *,
    resource_class: ev.ResourceClass,
    slots: int,
    with_runner: bool = True,
    llm_settings: object | None = None,
    gpus: GpuPlan | None = None,
    with_trainer: bool = False,
    elsewhere: Collection[str] = (),
) -> list[asyncio.Task]:
    """The search's roles as tasks of this process, except those `elsewhere` (run as
    processes of their own); they still talk only through NATS. A role's modules are
    imported only when it runs here (the rl-trainer's torch, transformers and trl are slow
    to import)."""
    check_roles(elsewhere)
    coros = []
    for role in search_roles(with_runner=with_runner, with_trainer=with_trainer):
        if role in elsewhere:
            continue
        if role == "projector":
            from groundloop.api.service import run as projector

            coros.append(projector(settings, stop))
        elif role == "evolver":
            from groundloop.evolver.service import run as evolver

            coros.append(evolver(settings, stop))
        elif role == "ideator":
            from groundloop.ideator.service import run as ideator

            coros.append(ideator(settings, stop, llm_settings=llm_settings))  # type: ignore[arg-type]
        elif role == "implementer":
            from groundloop.implementer.service import run as implementer

            coros.append(implementer(settings, stop, llm_settings=llm_settings))  # type: ignore[arg-type]
        elif role == "runner":
            from groundloop.runner.service import run as runner

            coros.append(runner(settings, runner_settings(resource_class, slots, gpus), stop))
        else:
            from groundloop.rl_trainer.service import run as rl_trainer

            coros.append(rl_trainer(settings, stop))
    return [asyncio.create_task(c) for c in coros]


def runner_settings(resource_class: ev.ResourceClass, slots: int, gpus: GpuPlan | None):
    """The local runner's settings: these in code, the rest from GROUNDLOOP_RUNNER_*."""
    from groundloop.runner.slots import RunnerSettings

    devices = {"gpus": gpus.gpus, "gpus_per_run": gpus.per_run} if gpus else {}
    return RunnerSettings(resource_class=resource_class, slots=slots, **devices)


def role_flags(
    role: str, *, resource_class: ev.ResourceClass, slots: int, gpus: GpuPlan | None
) -> tuple[str, ...]:
    """The command-line flags that give a role's process what run_services passes in code."""
    if role != "runner":
        return ()
    flags = ("--resource-class", resource_class, "--slots", str(slots))
    if gpus:
        flags += ("--gpus", ",".join(gpus.gpus), "--gpus-per-run", str(gpus.per_run))
    return flags


def role_log_dir(settings: Settings, search_id: str) -> Path:
    return settings.data_dir / "searches" / search_id


def role_process_group(
    settings: Settings,
    search_id: str,
    stop: asyncio.Event,
    *,
    llm_settings: object | None,
    runner_grace_s: float = 0.0,
) -> RoleProcesses:
    """The (empty) set of role processes of a search, with the environment they are given;
    `runner_grace_s`: how long its runner may take to hand back runs when stopped."""
    from pydantic_settings import BaseSettings

    model = llm_settings if isinstance(llm_settings, BaseSettings) else None
    return RoleProcesses(
        environment=role_environment(settings, model, os.environ),
        log_dir=role_log_dir(settings, search_id),
        stop_grace_s=runner_grace_s + STOP_MARGIN_S,
        search_stopped=stop,
    )
