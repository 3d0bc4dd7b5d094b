"""Container backends for production runners: the command that runs one step of a run
inside docker, podman or apptainer instead of directly on the host.

Selected by RunnerSettings.backend (with RunnerSettings.image). The workspace, the run
directory (where GROUNDLOOP_METRICS_OUT points) and the cache directory are mounted at the same
paths inside the container, so every path the run protocol hands out stays valid. The
container gets no network, the run's GPUs only, a memory and a pids limit, and exactly the
allow-listed environment the sandbox built. The outer process is still run under
groundloop.execution.sandbox, which keeps the wall budget (the engine forwards SIGTERM/SIGKILL, and
`--rm`/`--init` reap what is inside).

Only command construction lives here (and is tested): this machine has no container engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ContainerRun:
    image: str
    workspace: Path
    mounts: tuple[Path, ...] = ()  # run dir, cache dir: mounted read-write at the same path
    devices: tuple[str, ...] = ()  # GPU ids for this run (the slot's CUDA_VISIBLE_DEVICES)
    memory_bytes: int | None = None
    max_processes: int | None = None
    network: bool = False
    env: dict[str, str] = field(default_factory=dict)
    name: str | None = None  # container name, e.g. the run id (lets an operator find it)


class ContainerBackend(Protocol):
    name: str

    def command(self, run: ContainerRun, cmd: list[str]) -> list[str]: ...


def _env_flags(flag: str, env: dict[str, str]) -> list[str]:
    return [part for key in sorted(env) for part in (flag, f"{key}={env[key]}")]


class Docker:
    """`docker run`: --gpus "device=0,1", --network none, --memory, --pids-limit."""

    name = "docker"
    engine = "docker"

    def command(self, run: ContainerRun, cmd: list[str]) -> list[str]:
        out = [self.engine, "run", "--rm", "--init", "--workdir", str(run.workspace)]
        if run.name:
            out += ["--name", run.name]
        if not run.network:
            out += ["--network", "none"]
        if run.memory_bytes is not None:
            out += ["--memory", str(run.memory_bytes), "--memory-swap", str(run.memory_bytes)]
        if run.max_processes is not None:
            out += ["--pids-limit", str(run.max_processes)]
        out += self.gpu_flags(run.devices)
        for path in (run.workspace, *run.mounts):
            out += ["--volume", f"{path}:{path}:rw"]
        env = {**run.env}
        if run.devices:  # inside, the granted devices are renumbered from 0
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(run.devices)))
        return [*out, *_env_flags("--env", env), run.image, *cmd]

    def gpu_flags(self, devices: tuple[str, ...]) -> list[str]:
        return ["--gpus", f'"device={",".join(devices)}"'] if devices else []


class Podman(Docker):
    """`podman run`: GPUs through CDI (nvidia.com/gpu=<id>), otherwise as docker."""

    name = "podman"
    engine = "podman"

    def gpu_flags(self, devices: tuple[str, ...]) -> list[str]:
        return [part for d in devices for part in ("--device", f"nvidia.com/gpu={d}")]


class Apptainer:
    """`apptainer exec` (HPC clusters): --containall --cleanenv, --net --network none, --nv."""

    name = "apptainer"

    def command(self, run: ContainerRun, cmd: list[str]) -> list[str]:
        out = ["apptainer", "exec", "--containall", "--cleanenv", "--pwd", str(run.workspace)]
        if not run.network:
            out += ["--net", "--network", "none"]
        if run.memory_bytes is not None:
            out += ["--memory", str(run.memory_bytes)]
        if run.max_processes is not None:
            out += ["--pids-limit", str(run.max_processes)]
        if run.devices:
            out.append("--nv")  # apptainer keeps host numbering: CUDA_VISIBLE_DEVICES selects
        for path in (run.workspace, *run.mounts):
            out += ["--bind", f"{path}:{path}:rw"]
        env = {
            **run.env,
            **({"CUDA_VISIBLE_DEVICES": ",".join(run.devices)} if run.devices else {}),
        }
        return [*out, *_env_flags("--env", env), run.image, *cmd]


BACKENDS: dict[str, type] = {"docker": Docker, "podman": Podman, "apptainer": Apptainer}


def backend_for(name: str) -> ContainerBackend | None:
    """The backend called `name`; None for "local" (run directly under the sandbox)."""
    if name == "local":
        return None
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(
            f"unknown container backend {name!r}; choose local, {', '.join(BACKENDS)}"
        ) from None
