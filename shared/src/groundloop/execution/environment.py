"""Environments: load one, show it to an ideator, patch a fresh copy, run it, read its metrics.

An environment is a folder under `environments/` holding `manifest.toml` (see
`groundloop.manifest`), the baseline code and a protected evaluation. This module and
`groundloop.execution.run_protocol` are the one place that knows the run protocol, used by the
implementer (pre-flight) and the runner:

    env = Environment.load("synthetic")
    made = env.materialize(workspace, diff)            # fresh copy + strict apply (PatchRejected)
    result = execute(env, workspace, seed=0, run_dir=..., cache_dir=...)
    result.outcome.status, result.outcome.score        # "succeeded", 0.62...

The steps of `execute` are described in `groundloop.execution.run_protocol`, where it lives.

Here: `Environment` (load, describe, materialize, verify, prepare, judge a metrics file).
`execute`, `provenance`, `hardware`, the digests, `Outcome`, `Execution` and
`ProtectedFileChanged` live in `groundloop.execution.run_protocol` and are re-exported here, where
callers have always imported them.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from groundloop.events import Provenance as Provenance
from groundloop.execution.applier import PatchRejected, apply_diff
from groundloop.execution.run_protocol import (
    LOG_TAIL_CHARS,
    Execution,
    Outcome,
    ProtectedFileChanged,
    _command,
    execute,
    provenance,
)
from groundloop.execution.run_protocol import hardware as hardware
from groundloop.execution.sandbox import Limits as Limits
from groundloop.execution.sandbox import ProcessResult as ProcessResult
from groundloop.execution.sandbox import allowed_environment, run_sandboxed
from groundloop.execution.tree_digests import (
    _digest_of,
    _file_digest,
    _source_digest,
    _tree_files,
    text_digest,
    tree_digest,
)
from groundloop.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest

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


class PrepareFailed(RuntimeError):
    """The manifest's `prepare` command failed; the message holds its log tail."""


@dataclass(frozen=True)
class Materialized:
    path: Path
    files_changed: list[str]
    patched_digest: str
    diff_digest: str


# --------------------------------------------------------------------------- environment


class Environment:
    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self.name = manifest.name
        # Runs get a copy and never see `root` (the bwrap sandbox does not mount it), so the
        # protected files read at load stay the reference: any later change is tampering.
        self.loaded_protected_digest = self.protected_digest()

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
        return tree_digest(self.root, source=True)

    def protected_digest(self) -> str:
        return _digest_of(self.root, self.protected_files, source=True)

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
        made = {""}  # folders of the copy made so far
        for rel in self.files():
            source, target = os.path.join(self.root, rel), os.path.join(workspace, rel)
            folder = os.path.dirname(rel)
            if folder not in made:
                os.makedirs(os.path.join(workspace, folder), exist_ok=True)
                made.add(folder)
            if os.path.islink(source):
                os.symlink(os.readlink(source), target)
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

    def verify_source(self) -> None:
        """Raise ProtectedFileChanged when the environment's own protected files (the source
        every workspace is copied from) differ from what was loaded: stop serving it."""
        now = (
            self.protected_digest()
            if all((self.root / rel).is_file() for rel in self.protected_files)
            else "missing"
        )
        if now != self.loaded_protected_digest:
            raise ProtectedFileChanged(
                f"environment {self.name}: protected files in its source folder {self.root} "
                "changed since it was loaded; refusing to run it (restore the files and "
                "restart, and find out what wrote there)"
            )

    def verify_protected(self, workspace: Path) -> None:
        """Raise ProtectedFileChanged naming the first protected file that differs."""
        for rel in self.protected_files:
            copy = Path(workspace) / rel
            if copy.is_symlink() or not copy.is_file():
                raise ProtectedFileChanged(
                    f"protected file {rel} was deleted or replaced in the workspace"
                )
            if _file_digest(copy) != _source_digest(str(self.root / rel)):
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
                    network=True,  # downloads; still its own pid, mount and user namespaces
                    limits=Limits(isolate=True),
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
