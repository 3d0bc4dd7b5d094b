"""GPUs for `groundloop search` on a GPU environment: how many a run needs (the manifest's
`resources.gpus`), which this machine has (nvidia-smi, else the driver's /proc entries; torch
is never imported here), and the local runner's devices. No GPU: exit 2 saying how to run
the runs on GPU machines instead."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console

from groundloop.execution.environment import Environment

console = Console()
PROC_GPUS = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class GpuPlan:
    gpus: list[str]  # device ids for the local runner (--gpus)
    per_run: int  # the manifest's resources.gpus (--gpus-per-run)

    @property
    def slots(self) -> int:
        return len(self.gpus) // self.per_run


def visible_gpus() -> list[str]:
    """Device ids of this machine's NVIDIA GPUs, [] when it has none."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listing = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=30, check=False
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            listing = ""
        ids = re.findall(r"^GPU (\d+):", listing, flags=re.MULTILINE)
        if ids:
            return ids
    if PROC_GPUS.is_dir():
        return [str(i) for i in range(len(list(PROC_GPUS.iterdir())))]
    return []


def plan_gpus(env: Environment, with_runner: bool) -> GpuPlan | None:
    """The local runner's GPUs for a GPU environment; None for a CPU environment or without
    a local runner. Exits 2 when this machine has fewer GPUs than one run needs."""
    manifest = env.manifest
    if manifest.resource_class == "cpu" or not with_runner:
        return None
    per_run = max(1, manifest.resources.gpus)
    gpus = visible_gpus()
    if len(gpus) >= per_run:
        return GpuPlan(gpus, per_run)
    found = f"{len(gpus)} GPU(s)" if gpus else "no GPU (nvidia-smi -L lists none)"
    console.print(
        f"[red]{env.name} runs need {per_run} GPU(s) each ({manifest.resource_class}) and this "
        f"machine has {found}. Run the runs on GPU machines instead: start the search here with "
        f"--no-runner, and on each GPU machine (same GROUNDLOOP_NATS_URL) run\n"
        f"  python -m groundloop.runner --resource-class {manifest.resource_class} "
        f"--gpus 0,1,... --gpus-per-run {per_run}[/]",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(2)
