"""Runner settings and slots: how many runs one replica holds at once, and on which devices.

A slot is a set of GPUs (given to the run as CUDA_VISIBLE_DEVICES) or, on a CPU runner, one
of N CPU slots. The replica's consumer fetches only while a slot is free (concurrency = slots).
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

    resource_class: ResourceClass = "cpu"
    slots: int | None = Field(
        default=None, ge=1
    )  # CPU slots; GPU runners: len(gpus) / gpus_per_run
    gpus: Annotated[list[str], NoDecode] = []  # device ids, e.g. ["0", "1", "2", "3"]
    gpus_per_run: int = Field(default=1, ge=1)
    backend: Literal["local", "docker", "podman", "apptainer"] = "local"
    image: str | None = None  # container image, for the container backends
    shutdown_grace_s: float = Field(default=30.0, ge=0)  # SIGTERM: let a run finish this long
    runner_id: str = Field(default_factory=_default_runner_id)
    log_chunk_bytes: int = Field(default=256 * 1024, ge=1024)
    log_flush_s: float = Field(default=2.0, gt=0)
    max_log_bytes: int = 64 * 1024 * 1024  # per run, in the object store; the rest is dropped
    max_processes: int = 512
    open_files: int = 4096
    file_size_bytes: int = 50 * 1024**3
    # RLIMIT_AS for CPU runs = memory_gb × this (address space exceeds resident memory: thread
    # stacks, allocator arenas); never set for GPU runs, whose drivers reserve huge ranges.
    address_space_factor: float | None = 3.0
    keep_workspaces: bool = False
    # Refuse to start unless every sandbox protection is in force on this host (bwrap, an
    # unprivileged run uid, namespaces, the memory cgroup); the production manifests set it.
    require_full_isolation: bool = False
    # A root runner's runs get uid run_uid_base + slot index (one uid per slot, so runs of
    # different slots cannot touch each other's files); None: every slot runs as 65534.
    run_uid_base: int | None = Field(default=None, ge=0)

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
    """Hands out free slots; `async with pool.slot() as s` waits for one."""

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
    async def slot(self) -> AsyncIterator[Slot]:
        taken = await self._free.get()
        try:
            yield taken
        finally:
            self._free.put_nowait(taken)
