"""What a runner runs and what it reports: the run's spec (from a PatchReady or a
RunRequested), the process's dependencies, and the run's one RunCompleted.

Shared by service.py (the consumer side) and execute.py (one run in the sandbox).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from groundloop.events import Event, PatchReady, RunCompleted, RunRequested, stable_id
from groundloop.execution.environment import Environment
from groundloop.runner.logs import PutArtifact
from groundloop.runner.slots import RunnerSettings, SlotPool
from groundloop.settings import Settings

PRODUCER = "runner"  # the same on every replica, so derived event ids agree across replicas


@dataclass(frozen=True)
class RunSpec:
    """What to run, from a PatchReady (first run of a patch) or a RunRequested."""

    run_id: str
    patch_id: str | None
    idea_id: str | None
    generation: int
    purpose: str
    seed: int
    environment: str
    environment_digest: str
    diff: str | None
    diff_key: str | None


def run_spec(event: Event) -> RunSpec:
    if isinstance(event, PatchReady):
        return RunSpec(
            stable_id(event.patch_id, event.seed),
            event.patch_id,
            event.idea_id,
            event.generation,
            "search",
            event.seed,
            event.environment,
            event.environment_digest,
            event.diff,
            event.diff_key,
        )
    if isinstance(event, RunRequested):
        return RunSpec(
            event.run_id,
            event.patch_id,
            event.idea_id,
            event.generation,
            event.purpose,
            event.seed,
            event.environment,
            event.environment_digest,
            event.diff,
            event.diff_key,
        )
    raise TypeError(f"the runner does not handle {event.type}")  # type: ignore[attr-defined]


@dataclass
class RunnerDeps:
    settings: Settings
    runner: RunnerSettings
    slots: SlotPool
    publish: Callable[[Event], Awaitable[object]]  # immediate publish (RunStarted)
    put_artifact: PutArtifact
    get_artifact: Callable[[str], Awaitable[bytes]]
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)  # SIGTERM received
    host: str = field(default_factory=socket.gethostname)
    environments: dict[str, tuple[Environment, str]] = field(
        default_factory=dict
    )  # name -> (env, digest)
    # One thread per slot for the blocking sandbox (asyncio's default pool has only cpus+4).
    executor: ThreadPoolExecutor | None = None
    # Slot index -> the protections its runs get on this host (name -> how, or "off: why"),
    # probed at start-up and recorded in every RunStarted.
    protections: dict[int, dict[str, str]] = field(default_factory=dict)


def completed(event: Event, spec: RunSpec, status: str, **fields: object) -> RunCompleted:
    """The run's one RunCompleted: index 0 of the runner role, whichever replica (or the
    exhaustion handler) writes it, so duplicates collapse in the stream."""
    return event.derive(
        RunCompleted,
        PRODUCER,
        0,
        run_id=spec.run_id,
        patch_id=spec.patch_id,
        idea_id=spec.idea_id,
        generation=spec.generation,
        purpose=spec.purpose,
        status=status,
        seed=spec.seed,
        **fields,
    )
