"""Environments: load one, show it to an ideator, patch a fresh copy, run it, read its metrics.

An environment is a folder under `environments/` holding `manifest.toml` (see
`groundloop.manifest`), the baseline code and a protected evaluation. This module is the one
place that knows the run protocol, used by the implementer (pre-flight) and the runner:

    env = Environment.load("synthetic")
    made = env.materialize(workspace, diff)            # fresh copy + strict apply (PatchRejected)
    result = execute(env, workspace, seed=0, run_dir=..., cache_dir=...)
    result.outcome.status, result.outcome.score        # "succeeded", 0.62...

`execute`: protected digests verified → entrypoint run under the wall budget in the sandbox
(`groundloop.sandbox.run_sandboxed`) → protected digests and sources verified again → the
protected `evaluate` step (when the manifest has one) writes GROUNDLOOP_METRICS_OUT, a fresh
file outside the workspace → `Environment.outcome` turns that file into an `Outcome`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.machinery
import importlib.metadata
import json
import math
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from groundloop.applier import PatchRejected, apply_diff
from groundloop.events import Provenance
from groundloop.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest
from groundloop.sandbox import Limits, ProcessResult, allowed_environment, run_sandboxed

__all__ = [
    "Environment",
    "Execution",
    "Materialized",
    "Outcome",
    "PatchRejected",
    "PrepareFailed",
    "ProtectedFileChanged",
    "execute",
    "provenance",
    "tree_digest",
    "text_digest",
]

MAX_METRICS_BYTES = 1_000_000
LOG_TAIL_CHARS = 2000
_IGNORED_DIRS = {"__pycache__", ".git", ".pytest_cache"}
_TOP_LEVEL_IGNORED = {"out"}  # run outputs (checkpoints, logs) are not part of the code


class ProtectedFileChanged(RuntimeError):
    """A protected file (or manifest.toml) differs from the environment's original."""


class PrepareFailed(RuntimeError):
    """The manifest's `prepare` command failed; the message holds its log tail."""


@dataclass(frozen=True)
class Materialized:
    path: Path
    files_changed: list[str]
    patched_digest: str
    diff_digest: str


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


# ------------------------------------------------------------------------------- digests


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _ignored(rel: Path) -> bool:
    parts = rel.parts
    return (
        any(p in _IGNORED_DIRS for p in parts)
        or rel.suffix == ".pyc"
        or (len(parts) > 1 and parts[0] in _TOP_LEVEL_IGNORED)
    )


def _tree_files(root: Path) -> list[str]:
    """Relative posix paths of every file and symlink under `root`, sorted, minus caches."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            rel = (here / name).relative_to(root)
            if not _ignored(rel):
                found.append(rel.as_posix())
        dirnames[:] = [
            d
            for d in dirnames
            if not _ignored((here / d).relative_to(root)) and not (here / d).is_symlink()
        ]
    return sorted(found)


def _file_digest(path: Path) -> str:
    if path.is_symlink():  # hash where it points, never what it points to
        return hashlib.sha256(b"symlink:" + os.readlink(path).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_of(root: Path, rels: list[str]) -> str:
    total = hashlib.sha256()
    for rel in rels:
        total.update(rel.encode() + b"\0" + _file_digest(root / rel).encode() + b"\n")
    return total.hexdigest()


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes (caches and top-level out/ ignored)."""
    return _digest_of(root, _tree_files(root))


# --------------------------------------------------------------------------- environment


class Environment:
    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self.name = manifest.name

    def __repr__(self) -> str:
        return f"Environment({self.name!r}, root={str(self.root)!r})"

    @classmethod
    def load(cls, name_or_path: str | Path, environments_dir: Path | None = None) -> Environment:
        """By name (a folder of `environments_dir`, default Settings().environments_dir) or
        by path; checks that the files the manifest names exist."""
        candidate = Path(name_or_path)
        if isinstance(name_or_path, str) and "/" not in name_or_path:  # a name, not a path
            if environments_dir is None:
                from groundloop.settings import Settings  # built on demand, never at import

                environments_dir = Settings().environments_dir
            candidate = environments_dir / name_or_path
            if not candidate.is_dir():
                known = (
                    sorted(
                        p.name for p in environments_dir.glob("*/") if (p / MANIFEST_NAME).is_file()
                    )
                    if environments_dir.is_dir()
                    else []
                )
                raise ManifestError(
                    f"no environment {name_or_path!r} in {environments_dir}; known: {known}"
                )
        root = candidate.resolve()
        manifest = load_manifest(root)
        _check_files(root, manifest)
        return cls(root, manifest)

    @property
    def protected_files(self) -> list[str]:
        """The manifest's protected files plus manifest.toml itself (always protected)."""
        return sorted(set(self.manifest.protected) | {MANIFEST_NAME})

    def files(self) -> list[str]:
        return _tree_files(self.root)

    def digest(self) -> str:
        return tree_digest(self.root)

    def protected_digest(self) -> str:
        return _digest_of(self.root, self.protected_files)

    def editable_sources(self) -> dict[str, str]:
        return {
            rel: (self.root / rel).read_text()
            for rel in self.manifest.editable
            if (self.root / rel).is_file()
        }

    def describe_for_prompt(self) -> str:
        """What an ideator or implementer sees: the description and the editable code; every
        other file is named with a one-line notice, never shown."""
        m = self.manifest
        parts = [
            f"# Environment: {m.name}",
            m.description.strip(),
            "",
            f"Metric: {m.metric.name} ({m.metric.direction}) on the {m.metric.split} split. "
            f"Hard wall-clock budget: {m.budget.wall_seconds:g} s per run.",
            "",
            "## Files",
        ]
        editable = set(m.editable)
        for rel in self.files():
            if rel in editable:
                continue
            notice = (
                "protected: hidden, and any edit to it is rejected"
                if rel in self.protected_files
                else "read-only: not shown, may not be edited"
            )
            parts.append(f"- {rel}: {notice}")
        if m.new_files:
            parts.append(f"- new files may be created matching: {', '.join(m.new_files)}")
        for rel, text in self.editable_sources().items():
            parts += [
                "",
                f"## {rel} (editable)",
                f"```{_fence_language(rel)}",
                text.rstrip("\n"),
                "```",
            ]
        return "\n".join(parts) + "\n"

    # ------------------------------------------------------------------------- workspace

    def materialize(self, workspace: Path, diff: str | None = None) -> Materialized:
        """Copy the environment into the empty (or missing) `workspace` and apply `diff`
        strictly. On PatchRejected the workspace holds the unpatched copy."""
        workspace = Path(workspace)
        if workspace.exists() and any(workspace.iterdir()):
            raise ValueError(
                f"workspace {workspace} is not empty; materialize into a fresh "
                "directory so no earlier run's files leak in"
            )
        workspace.mkdir(parents=True, exist_ok=True)
        for rel in self.files():
            source, target = self.root / rel, workspace / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                target.symlink_to(os.readlink(source))
            else:
                shutil.copy2(source, target)
        changed: list[str] = []
        if diff:
            changed = apply_diff(
                workspace,
                diff,
                editable=self.manifest.editable,
                new_files=self.manifest.new_files,
                protected=self.protected_files,
            )
        return Materialized(workspace, changed, tree_digest(workspace), text_digest(diff or ""))

    def verify_protected(self, workspace: Path) -> None:
        """Raise ProtectedFileChanged naming the first protected file that differs."""
        for rel in self.protected_files:
            copy = Path(workspace) / rel
            if copy.is_symlink() or not copy.is_file():
                raise ProtectedFileChanged(
                    f"protected file {rel} was deleted or replaced in the workspace"
                )
            if _file_digest(copy) != _file_digest(self.root / rel):
                raise ProtectedFileChanged(f"protected file {rel} was modified in the workspace")

    def prepare(self, cache_dir: Path, *, wall_seconds: float = 3600.0) -> None:
        """Run manifest.prepare once per environment digest (downloads, base models), under a
        file lock so concurrent runners on one host wait for the first instead of racing."""
        command = self.manifest.prepare
        if not command:
            return
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        marker = cache_dir / f".prepared-{self.digest()[:16]}"
        with open(cache_dir / ".prepare.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if marker.exists():
                return
            # A scratch copy as working directory, so prepare can never alter the environment.
            with tempfile.TemporaryDirectory(prefix="groundloop-prepare-") as scratch:
                work = Path(scratch) / "env"
                self.materialize(work)
                (Path(scratch) / "home").mkdir()
                env = allowed_environment(
                    {"GROUNDLOOP_CACHE_DIR": str(cache_dir)}, Path(scratch) / "home"
                )
                result = run_sandboxed(
                    _command(command),
                    cwd=work,
                    env=env,
                    wall_seconds=wall_seconds,
                    network=True,
                    log_path=cache_dir / "prepare.log",
                )
            if result.status != "exited" or result.returncode != 0:
                raise PrepareFailed(
                    f"{self.name}: prepare {command} {result.status} (exit {result.returncode}); "
                    f"see {cache_dir / 'prepare.log'}\n{result.output_tail[-LOG_TAIL_CHARS:]}"
                )
            marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")

    # ------------------------------------------------------------------------------ metrics

    def outcome(self, metrics_path: Path, log_tail: str = "") -> Outcome:
        """The run's Outcome from the metrics file the protected evaluation wrote."""
        metric = self.manifest.metric
        tail = f"\n--- log tail ---\n{log_tail[-LOG_TAIL_CHARS:]}" if log_tail else ""
        path = Path(metrics_path)
        if not path.is_file():
            return Outcome("failed", reason=f"no metrics were written ({path.name} missing){tail}")
        if path.stat().st_size > MAX_METRICS_BYTES:
            return Outcome("failed", reason=f"metrics file is over {MAX_METRICS_BYTES} bytes")
        try:
            raw = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            return Outcome("failed", reason=f"metrics file is not JSON ({exc}){tail}")
        if not isinstance(raw, dict):
            return Outcome("failed", reason="metrics file must hold a JSON object name -> number")
        if isinstance(raw.get("rejected"), str):  # the protected evaluation refused the run
            return Outcome("rejected", reason=raw["rejected"][:2000])
        # Secondary values that are not finite numbers are dropped: events carry no NaN.
        metrics = {
            str(k): float(v)
            for k, v in raw.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        value = raw.get(metric.name)
        if value is None:
            return Outcome(
                "failed",
                metrics,
                reason=f"metric {metric.name!r} missing from the "
                f"metrics (got {sorted(raw)[:10]}){tail}",
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            return Outcome(
                "failed", metrics, reason=f"metric {metric.name!r} is {value!r}, not a number"
            )
        if not math.isfinite(value):
            return Outcome("failed", metrics, reason=f"metric {metric.name} is {value}{tail}")
        value = float(value)
        if hack := metric.suspected_hack(value):
            return Outcome("rejected", metrics, reason=hack)
        return Outcome("succeeded", metrics, score=value, reward=metric.to_reward(value))


def _fence_language(rel: str) -> str:
    return {".py": "python", ".toml": "toml", ".json": "json", ".sh": "bash"}.get(
        Path(rel).suffix, ""
    )


def _check_files(root: Path, manifest: Manifest) -> None:
    where = root / MANIFEST_NAME
    for kind, paths in (("editable", manifest.editable), ("protected", manifest.protected)):
        for rel in paths:
            path = root / rel
            if path.is_symlink() or not path.is_file():
                raise ManifestError(
                    f"{where}: {kind} file {rel!r} is not a regular file in "
                    f"{root}; fix the path or add the file"
                )
    for knob in manifest.knobs:
        text = (root / knob.file).read_text()
        if not re.search(rf"^{knob.name}\s*(?::[^=\n]*)?=", text, re.MULTILINE):
            raise ManifestError(
                f"{where}: knob {knob.name} is not a module-level constant "
                f"('{knob.name} = ...') in {knob.file}; add it or fix the name"
            )


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
    env.prepare(cache_dir)
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


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


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
