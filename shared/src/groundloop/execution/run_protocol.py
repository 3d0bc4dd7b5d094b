"""The run protocol: run a materialized workspace in the sandbox and judge it.

    result = execute(env, workspace, seed=0, run_dir=..., cache_dir=...)
    result.outcome.status, result.outcome.score        # "succeeded", 0.62...

`execute`: the environment's source checked against its digest at load, protected digests
verified → entrypoint run under the wall budget in the sandbox
(`groundloop.execution.sandbox.run_sandboxed`) → protected digests and sources verified again → the
protected `evaluate` step (when the manifest has one) writes GROUNDLOOP_METRICS_OUT, a fresh
file outside the workspace → `Environment.outcome` turns that file into an `Outcome`.
`provenance` records what is needed to reproduce (or distrust) a run's number.

Also here, because the protocol judges by them: `ProtectedFileChanged`, `Outcome` and
`Execution` (the tree digests are in `groundloop.execution.tree_digests`). Split from `groundloop.execution.environment` (loading, describing,
materializing and preparing an environment), which imports this module and re-exports all of
it; this module needs an `Environment` only as the argument it is given, so it never imports
that one at run time and the two form no import cycle. The underscored helpers imported from
here by `groundloop.execution.environment` are private to the pair.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import importlib.metadata
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from groundloop.events import Provenance
from groundloop.execution.sandbox import Limits, ProcessResult, allowed_environment, run_sandboxed
from groundloop.execution.tree_digests import _file_digest, _tree_files
from groundloop.execution.tree_digests import text_digest as text_digest
from groundloop.execution.tree_digests import tree_digest as tree_digest

if TYPE_CHECKING:
    from groundloop.execution.environment import Environment

LOG_TAIL_CHARS = 2000


class ProtectedFileChanged(RuntimeError):
    """A protected file (or manifest.toml) differs from the environment's original."""


@dataclass(frozen=True)
class Outcome:
    status: Literal["succeeded", "failed", "timed_out", "rejected"]
    metrics: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    reward: float = 0.0  # failed, timed-out and rejected runs earn nothing (as in the paper)
    reason: str | None = None


@dataclass(frozen=True)
class Execution:
    outcome: Outcome
    train: ProcessResult
    evaluate: ProcessResult | None
    wall_seconds: float
    isolation: dict[str, str]


def _command(command: list[str]) -> list[str]:
    """A leading "python" means the runner's own interpreter."""
    return [sys.executable, *command[1:]] if command[0] == "python" else list(command)


# ----------------------------------------------------------------------------- execute


# Anything Python would import or execute from the workspace: sources, extension modules
# (which shadow a .py of the same name) and .pth files.
_CODE_SUFFIXES = (*importlib.machinery.all_suffixes(), ".pth")


def _sources(workspace: Path) -> dict[str, str]:
    return {
        rel: _file_digest(workspace / rel)
        for rel in _tree_files(workspace)
        if rel.endswith(_CODE_SUFFIXES)
    }


def _purge_bytecode(workspace: Path) -> None:
    # A run may plant a .pyc with a forged source stamp for a module the evaluation imports.
    for cache in list(workspace.rglob("__pycache__")):
        if cache.is_dir() and not cache.is_symlink():
            shutil.rmtree(cache, ignore_errors=True)
        else:
            cache.unlink(missing_ok=True)
    for pyc in workspace.rglob("*.pyc"):
        pyc.unlink(missing_ok=True)


def _tampering(env: Environment, workspace: Path, before: dict[str, str]) -> str | None:
    try:
        env.verify_protected(workspace)
    except ProtectedFileChanged as exc:
        return f"{exc} during training"
    after = _sources(workspace)
    changed = sorted(rel for rel in set(before) | set(after) if before.get(rel) != after.get(rel))
    if changed:
        return (
            f"training created or changed code files {changed[:5]}; a run may write "
            "outputs, never code that the evaluation could import"
        )
    return None


def protocol_limits(env: Environment, limits: Limits | None) -> Limits:
    """`limits` as the run protocol applies them: in the bwrap sandbox unless the caller
    chose otherwise, resident memory capped at the manifest's resources.memory_gb (for CPU
    and GPU runs alike) unless the caller set a cap."""
    limits = limits or Limits()
    if limits.isolate is None:
        limits = replace(limits, isolate=True)
    if limits.resident_memory_bytes is None:
        memory = int(env.manifest.resources.memory_gb * 1024**3)
        limits = replace(limits, resident_memory_bytes=memory)
    return limits


def execute(
    env: Environment,
    workspace: Path,
    *,
    seed: int,
    split: str = "val",
    device: str = "cpu",
    run_dir: Path,
    cache_dir: Path,
    smoke: bool = False,
    wall_seconds: float | None = None,
    limits: Limits | None = None,
    network: bool = False,
    extra_env: dict[str, str] | None = None,
    on_output: Callable[[bytes], None] | None = None,
) -> Execution:
    """Run a materialized workspace by the run protocol (module docstring) and judge it.

    `smoke` runs manifest.smoke (or the entrypoint) with GROUNDLOOP_SMOKE=1 under
    budget.smoke_seconds; `wall_seconds` overrides the budget. Logs (train.log,
    evaluate.log) and the metrics file go to `run_dir`, which must lie outside the workspace.
    Raises ProtectedFileChanged if the workspace is already altered before the run; every
    problem after that is reported in the returned Outcome.
    """
    started = time.monotonic()
    workspace, run_dir = Path(workspace).resolve(), Path(run_dir).resolve()
    if run_dir.is_relative_to(workspace):
        raise ValueError(f"run_dir {run_dir} must lie outside the workspace {workspace}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "home").mkdir(exist_ok=True)
    # The sandbox binds only folders that exist: a first run without `prepare` gets its cache.
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    env.verify_source()
    env.prepare(cache_dir)
    limits = protocol_limits(env, limits)
    budget = env.manifest.budget
    base = {
        "GROUNDLOOP_SEED": str(seed),
        "GROUNDLOOP_DEVICE": device,
        "GROUNDLOOP_SPLIT": split,
        "GROUNDLOOP_CACHE_DIR": str(Path(cache_dir).resolve()),
        "PYTHONHASHSEED": str(seed),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONNOUSERSITE": "1",  # no usercustomize.py from a HOME a run could write to
        **(extra_env or {}),
    }
    if smoke:
        base["GROUNDLOOP_SMOKE"] = "1"
    # A fresh, unguessable name: nothing training left behind can pose as the evaluation's.
    metrics_path = run_dir / f"metrics-{secrets.token_hex(8)}.json"
    evaluate_cmd = env.manifest.evaluate
    train_env = (
        dict(base) if evaluate_cmd else {**base, "GROUNDLOOP_METRICS_OUT": str(metrics_path)}
    )
    command = env.manifest.smoke if smoke and env.manifest.smoke else env.manifest.entrypoint
    train_wall = wall_seconds or (budget.smoke_seconds if smoke else budget.wall_seconds)

    def finish(
        outcome: Outcome, train: ProcessResult, evaluation: ProcessResult | None = None
    ) -> Execution:
        return Execution(
            outcome, train, evaluation, time.monotonic() - started, dict(train.isolation)
        )

    env.verify_protected(workspace)
    sources_before = _sources(workspace)
    train = run_sandboxed(
        _command(command),
        cwd=workspace,
        env=allowed_environment(train_env, run_dir / "home"),
        wall_seconds=train_wall,
        grace_seconds=budget.grace_seconds,
        limits=limits,
        log_path=run_dir / "train.log",
        network=network,
        on_output=on_output,
    )
    env.verify_source()  # the run cannot reach the source; this catches anything else that did
    if reason := _tampering(env, workspace, sources_before):
        return finish(Outcome("rejected", reason=reason), train)
    if train.status == "timed_out":
        return finish(
            Outcome(
                "timed_out",
                reason=f"training exceeded its {train_wall:g} s wall "
                f"budget\n--- log tail ---\n{train.output_tail[-LOG_TAIL_CHARS:]}",
            ),
            train,
        )
    if train.status != "exited" or train.returncode != 0:
        how = train.isolation.get("limit_hit") or f"exit code {train.returncode}"
        return finish(
            Outcome(
                "failed",
                reason=f"training {train.status} ({how})\n--- log tail ---"
                f"\n{train.output_tail[-LOG_TAIL_CHARS:]}",
            ),
            train,
        )
    if not evaluate_cmd:
        return finish(env.outcome(metrics_path, train.output_tail), train)
    _purge_bytecode(workspace)
    metrics_path.unlink(missing_ok=True)
    # A HOME training never saw: nothing it planted there (config, caches) reaches evaluation.
    eval_home = run_dir / f"home-evaluate-{secrets.token_hex(8)}"
    eval_home.mkdir()
    evaluation = run_sandboxed(
        _command(evaluate_cmd),
        cwd=workspace,
        env=allowed_environment({**base, "GROUNDLOOP_METRICS_OUT": str(metrics_path)}, eval_home),
        wall_seconds=budget.eval_seconds,
        grace_seconds=budget.grace_seconds,
        limits=limits,
        log_path=run_dir / "evaluate.log",
        network=False,
        on_output=on_output,
    )
    verdict = env.outcome(metrics_path, evaluation.output_tail)
    if verdict.status == "rejected":  # the evaluation's own verdict (e.g. a future-token leak)
        return finish(verdict, train, evaluation)
    if evaluation.status != "exited" or evaluation.returncode != 0:
        return finish(
            Outcome(
                "failed",
                reason=f"evaluation {evaluation.status} (exit "
                f"{evaluation.returncode})\n--- log tail ---\n"
                f"{evaluation.output_tail[-LOG_TAIL_CHARS:]}",
            ),
            train,
            evaluation,
        )
    return finish(verdict, train, evaluation)


# --------------------------------------------------------------------------- provenance


@functools.cache  # a metadata scan of sys.path per call; installed versions don't change under a running process
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache  # /proc/cpuinfo is long on a big host, and read for every run's provenance
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.cache
def _gpu_names() -> list[str]:
    torch = sys.modules.get("torch")  # never import torch just for this (seconds)
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_available():
                return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
    return []


def hardware() -> str:
    cpu = f"{_cpu_model()} x{os.cpu_count()}"
    gpus = _gpu_names()
    return f"{cpu}; {len(gpus)}x {gpus[0]}" if gpus else cpu


def provenance(
    env: Environment,
    *,
    seed: int,
    patched_digest: str | None,
    patch_digest: str | None,
    isolation: dict[str, str],
) -> Provenance:
    """Enough to reproduce (or distrust) a run's number."""
    libraries = {
        name: v for name in ("groundloop", "numpy", "transformers", "trl") if (v := _version(name))
    }
    return Provenance(
        environment_digest=env.digest(),
        patched_digest=patched_digest,
        patch_digest=patch_digest,
        seed=seed,
        python=platform.python_version(),
        torch=_version("torch"),
        libraries=libraries,
        hardware=hardware(),
        host=socket.gethostname(),
        isolation=dict(isolation),
    )
