"""Roles of `groundloop search` as child processes (`--role-processes`), so the search uses
more than the one core a Python process gets; they still talk only through NATS.

Each child runs the role's own entry point (`python -m groundloop.<role>`, through
`groundloop.cli.role_child`, which ties its life to the search's) with the search's settings
as GROUNDLOOP_* variables: every field of Settings (broker URL, credentials, data dir, store,
stream names, telemetry) and, when the search was given one, of LLMSettings (model servers,
keys, limits, prices), written so that the child's Settings()/LLMSettings() equal the
parent's objects (`settings_variables`). A child's output goes to
`<data dir>/searches/<search>/<role>.log` (appended: a resumed search keeps the earlier
lines).

Supervision (`RoleProcesses`): a child that exits while the search runs raises
RoleProcessDied naming the role, its exit status and the tail of its log; stopping (the
search ended, Ctrl-C, SIGTERM, an exception) sends every child SIGTERM, waits for each to
finish the work in hand (a runner may take its shutdown grace to hand back its runs), then
SIGKILLs any still running and reaps them all, so none outlives the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydantic import AliasChoices, BaseModel, SecretStr
from pydantic_core import to_json
from pydantic_settings import BaseSettings

from groundloop.cli.role_child import SEARCH_PID_VARIABLE

# role -> the module its entry point is (`python -m MODULE`) and its fixed flags
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "projector": ("groundloop.api", "--no-http"),
    "evolver": ("groundloop.evolver",),
    "ideator": ("groundloop.ideator",),
    "implementer": ("groundloop.implementer",),
    "runner": ("groundloop.runner",),
    "rl-trainer": ("groundloop.rl_trainer",),
}
POLL_S = 0.25  # how often a child's liveness is checked (a waitpid, nothing more)
TAIL_LINES = 40  # of a dead child's log, in the error


class RoleProcessDied(Exception):
    """A role's process exited while the search was running."""


def _encoded(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list | tuple | BaseModel):
        return to_json(value).decode()  # pydantic-settings parses complex fields as JSON
    return str(value)  # str, int, float (repr round-trips), Path, Literal values


def settings_variables(settings: BaseSettings) -> dict[str, str | None]:
    """Every field of `settings` as the environment variables its class reads (None: the
    variable must be absent), so that the class built from them equals `settings`. A field
    with alias choices (OPENAI_API_KEY and the like) sets every one of them: the class takes
    the first it finds, and an inherited one must not win over the value given here."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    variables: dict[str, str | None] = {}
    for name, info in type(settings).model_fields.items():
        value = getattr(settings, name)
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names = [choice.upper() for choice in alias.choices if isinstance(choice, str)]
        elif isinstance(alias, str):
            names = [alias.upper()]
        else:
            names = [f"{prefix}{name}".upper()]
        for variable in names:
            variables[variable] = None if value is None else _encoded(value)
    return variables


def role_environment(
    settings: BaseSettings, llm_settings: BaseSettings | None, base: Mapping[str, str]
) -> dict[str, str]:
    """`base` (this process's environment) with the search's settings written over it."""
    env = dict(base)
    for part in (settings, llm_settings):
        if part is None:
            continue  # no model settings given: the roles read the environment, as in-process
        for variable, value in settings_variables(part).items():
            if value is None:
                env.pop(variable, None)
            else:
                env[variable] = value
    env[SEARCH_PID_VARIABLE] = str(os.getpid())
    env["PYTHONUNBUFFERED"] = "1"  # a child killed mid-line still leaves its last words
    return env


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError as exc:
        return f"(its log cannot be read: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def exit_status(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass
class RoleProcess:
    role: str
    process: subprocess.Popen
    log_path: Path
    log: IO[bytes]


@dataclass
class RoleProcesses:
    """The search's role processes. Use as `async with`: leaving the block, however it is
    left, stops and reaps every child started in it."""

    environment: dict[str, str]
    log_dir: Path
    stop_grace_s: float  # how long a child may take to stop after SIGTERM
    search_stopped: asyncio.Event  # set: the search is ending, children exiting is expected
    children: list[RoleProcess] = field(default_factory=list)
    watchers: list[asyncio.Task] = field(default_factory=list)
    stopping: bool = False

    async def __aenter__(self) -> RoleProcesses:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self, role: str, flags: tuple[str, ...] = ()) -> RoleProcess:
        """Start `role` (ENTRY_POINTS) with extra `flags`; a task in `watchers` raises
        RoleProcessDied if it exits before `stop`."""
        module, *fixed = ENTRY_POINTS[role]
        argv = [sys.executable, "-m", "groundloop.cli.role_child", module, *fixed, *flags]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{role}.log"
        log = path.open("ab")
        stamp = dt.datetime.now().isoformat(timespec="seconds")
        log.write(f"--- {stamp} the search starts {role}: python {' '.join(argv[1:])}\n".encode())
        log.flush()
        try:
            # Same process group as the search: a Ctrl-C in its terminal, or a kill of its
            # group, reaches the roles as it reached them when they were tasks of it.
            process = subprocess.Popen(
                argv,
                env=self.environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            log.close()
            raise
        child = RoleProcess(role, process, path, log)
        self.children.append(child)
        self.watchers.append(asyncio.create_task(self._watch(child), name=f"watch {role}"))
        return child

    async def _watch(self, child: RoleProcess) -> None:
        while child.process.poll() is None:
            if self.stopping or self.search_stopped.is_set():
                return
            await asyncio.sleep(POLL_S)
        if not (self.stopping or self.search_stopped.is_set()):
            raise RoleProcessDied(
                f"the {child.role} process (pid {child.process.pid}) "
                f"{exit_status(child.process.returncode)} while the search was running; the "
                f"last lines of its log {child.log_path}:\n{log_tail(child.log_path)}\n"
                "Run the same command again to resume the search from its log."
            )

    def raise_failure(self) -> None:
        """Raise the RoleProcessDied of a child that has died, if one has."""
        for watcher in self.watchers:
            if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
                raise watcher.exception()  # type: ignore[misc]

    def running(self) -> list[RoleProcess]:
        return [c for c in self.children if c.process.poll() is None]

    async def stop(self) -> None:
        """SIGTERM every child, wait up to stop_grace_s for all of them, SIGKILL the rest,
        reap them all. Safe to call more than once, and kills and reaps even when the wait
        itself is interrupted (cancelled)."""
        self.stopping = True
        try:
            for child in self.running():
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_grace_s
            while self.running() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            for child in self.running():
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
            for child in self.children:
                child.process.wait()  # killed above if it was still running: returns at once
                child.log.close()
            for watcher in self.watchers:
                watcher.cancel()
        await asyncio.gather(*self.watchers, return_exceptions=True)
