"""Runner settings and slots: how many runs one replica holds at once, and on which devices.

A slot is a set of GPUs (given to the run as CUDA_VISIBLE_DEVICES) or, on a CPU runner, one
of N CPU slots. The replica's consumer holds at most slots + `prefetch` runs: a prefetched run
is checked and materialised while it waits, so a slot starts its next run as soon as one ends,
and a run's slot is given back when its process ends (its log upload and RunCompleted follow
while the next run is fetched).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from groundloop.events import ResourceClass
from groundloop.execution.bubblewrap import DEFAULT_RUN_UID


def _default_runner_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RunnerSettings(BaseSettings):
    """`GROUNDLOOP_RUNNER_*` variables or `python -m groundloop.runner --option` flags."""

    model_config = SettingsConfigDict(env_prefix="GROUNDLOOP_RUNNER_", extra="ignore")

    resource_class: ResourceClass = Field(
        default="cpu",
        description="the resource class this runner serves (cpu, gpu1, gpu8); it binds to that class's PatchReady/RunRequested subjects",
    )
    slots: int | None = Field(
        default=None, ge=1, description="CPU runs at once; GPU runners: len(gpus) / gpus_per_run"
    )
    gpus: Annotated[list[str], NoDecode] = Field(
        default=[], description="GPU device ids this runner may use, e.g. 0,1,2,3"
    )
    gpus_per_run: int = Field(
        default=1, ge=1, description="GPUs bound to each run (1 for grpo-math, 8 for nanogpt)"
    )
    backend: Literal["local", "docker", "podman", "apptainer"] = Field(
        default="local",
        description="how runs are started: local (bubblewrap sandbox); container backends are refused until wired",
    )
    image: str | None = Field(
        default=None, description="container image, for the container backends"
    )
    prefetch: int | None = Field(
        default=None,
        ge=0,
        description="runs held beyond the slots, materialised and waiting for one to free (default: 1 on CPU runners, whose runs are short; 0 on GPU runners, where a held run could wait a whole run behind a busy slot while another replica idles)",
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="on SIGTERM, how long a run in hand may finish before it is stopped and handed back",
    )
    runner_id: str = Field(
        default_factory=_default_runner_id, description="this replica's name (default: host-pid)"
    )
    log_chunk_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        description="run logs are streamed to the object store in chunks of this size",
    )
    log_flush_s: float = Field(
        default=2.0, gt=0, description="a partial log chunk is flushed after this many seconds"
    )
    max_log_bytes: int = Field(
        default=64 * 1024 * 1024, description="per run, in the object store; the rest is dropped"
    )
    max_processes: int = Field(
        default=512, description="process cap per run (pids.max / RLIMIT_NPROC)"
    )
    open_files: int = Field(default=4096, description="RLIMIT_NOFILE per run")
    file_size_bytes: int = Field(default=50 * 1024**3, description="RLIMIT_FSIZE per run")
    address_space_factor: float | None = Field(
        default=3.0,
        description="RLIMIT_AS for CPU runs = memory_gb x this (never for GPU runs, whose drivers reserve huge ranges); resident memory is capped by the memory cgroup",
    )
    keep_workspaces: bool = Field(
        default=False, description="keep each run's workspace after it ends (debugging)"
    )
    require_full_isolation: bool = Field(
        default=False,
        description="refuse to start unless every sandbox protection is in force on this host (bwrap, an unprivileged run uid, namespaces, the memory cgroup)",
    )
    run_uid_base: int | None = Field(
        default=None,
        ge=0,
        description="a root runner's runs get uid run_uid_base + slot index; unset: every slot runs as 65534",
    )

    @field_validator("gpus", mode="before")
    @classmethod
    def _split_gpus(cls, value: object) -> object:
        if isinstance(value, str):  # "0,1,2,3" from a flag or an environment variable
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, int):
            return [str(value)]
        return value

    @model_validator(mode="after")
    def _slots_fit_devices(self) -> RunnerSettings:
        if self.gpus and len(self.gpus) < self.gpus_per_run:
            raise ValueError(
                f"--gpus lists {len(self.gpus)} device(s) but --gpus-per-run is {self.gpus_per_run}; "
                "list more devices or lower --gpus-per-run"
            )
        if self.prefetch is None:
            self.prefetch = 1 if self.resource_class == "cpu" else 0
        if self.resource_class != "cpu" and not self.gpus:
            raise ValueError(
                f"resource class {self.resource_class} needs GPUs: pass --gpus 0,1,... "
                "(or GROUNDLOOP_RUNNER_GPUS)"
            )
        return self


@dataclass(frozen=True)
class Slot:
    index: int
    devices: tuple[str, ...] = ()  # GPU ids; empty on a CPU slot

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.devices)  # "" hides every GPU from a CPU run


def run_uid(runner: RunnerSettings, slot: Slot) -> int:
    """The uid runs in `slot` get (when the runner is root; bubblewrap module)."""
    return DEFAULT_RUN_UID if runner.run_uid_base is None else runner.run_uid_base + slot.index


def plan_slots(runner: RunnerSettings) -> list[Slot]:
    """Disjoint GPU sets of gpus_per_run each (leftover devices unused), or N CPU slots."""
    if runner.gpus:
        count = len(runner.gpus) // runner.gpus_per_run
        if runner.slots is not None:
            count = min(count, runner.slots)
        per = runner.gpus_per_run
        return [Slot(i, tuple(runner.gpus[i * per : (i + 1) * per])) for i in range(count)]
    return [Slot(i) for i in range(runner.slots or 1)]


class SlotPool:
    """Hands out free slots in the order runs queued for them, so runs start in the order they
    were fetched whichever is materialised first::

        async with pool.queue(stop) as turn:  # takes this run's place in line
            ...                               # check and materialise meanwhile
            slot = await turn.slot()          # None when `stop` is set first
            ...
            turn.give_back()                  # or when the block ends
    """

    def __init__(self, slots: list[Slot]) -> None:
        if not slots:
            raise ValueError("a runner needs at least one slot")
        self.slots = slots
        self._free: asyncio.Queue[Slot] = asyncio.Queue()
        for slot in slots:
            self._free.put_nowait(slot)

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def free(self) -> int:
        return self._free.qsize()

    @contextlib.asynccontextmanager
    async def queue(self, stop: asyncio.Event | None = None) -> AsyncIterator[Turn]:
        turn = Turn(self._free, asyncio.ensure_future(self._take(stop or asyncio.Event())))
        try:
            yield turn
        finally:
            await turn.leave()

    async def _take(self, stop: asyncio.Event) -> Slot | None:
        """The next free slot, or None when `stop` is set first: a runner shutting down starts
        nothing, even with a slot free."""
        if stop.is_set():
            return None
        getting = asyncio.ensure_future(self._free.get())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._give_back(getting)
            raise
        finally:
            stopping.cancel()
        if stop.is_set():
            self._give_back(getting)
            return None
        return getting.result()

    def _give_back(self, getting: asyncio.Future[Slot]) -> None:
        if getting.done() and not getting.cancelled():
            self._free.put_nowait(getting.result())
        else:
            getting.cancel()


class Turn:
    """One run's place in line for a slot (`SlotPool.queue`)."""

    def __init__(self, free: asyncio.Queue[Slot], taking: asyncio.Task[Slot | None]) -> None:
        self._free, self._taking, self._given_back = free, taking, False

    async def slot(self) -> Slot | None:
        return await asyncio.shield(self._taking)  # a cancelled waiter leaves via leave()

    def give_back(self) -> None:
        """The slot is free again (once; later calls do nothing)."""
        if self._given_back or not self._taking.done() or self._taking.cancelled():
            return
        self._given_back = True
        if (taken := self._taking.result()) is not None:
            self._free.put_nowait(taken)

    async def leave(self) -> None:
        if not self._taking.done():  # left the line before its turn
            self._taking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._taking
        self.give_back()
