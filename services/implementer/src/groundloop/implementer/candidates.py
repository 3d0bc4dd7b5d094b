"""One candidate patch checked as a runner would meet it: strict apply, normalise
(`make_diff`), materialise into a fresh workspace (Environment.materialize), pre-flight there
(preflight.py) in the runner's sandbox, full isolation required when the implementer was
started with it. `ImplementerDeps` is what the implementer's handler needs from its process.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from groundloop.events import ModelPrice, PreflightReport, SearchStarted
from groundloop.execution.applier import PatchRejected, apply_to_sources, make_diff
from groundloop.execution.environment import Environment, Materialized
from groundloop.execution.sandbox import Limits
from groundloop.implementer.llm_patch import Verdict
from groundloop.implementer.preflight import failure_detail, run_preflight
from groundloop.llm.client import LLMClient

PRODUCER = "implementer"
INLINE_DIFF_BYTES = 256 * 1024  # larger diffs go to the object store (events stay small)


@dataclass
class ImplementerDeps:
    search: Callable[[str], SearchStarted | None]  # search id -> its SearchStarted
    environment: Callable[[str], Environment]  # name -> Environment
    llm: Callable[[str, dict[str, ModelPrice] | None], LLMClient]  # model spec, prices -> client
    work_dir: Path  # scratch space for workspaces (emptied after each check)
    cache_dir: Path  # GROUNDLOOP_CACHE_DIR root; one folder per environment
    put_artifact: Callable[[str, bytes], str] | None = None  # for diffs over the inline limit
    producer: str = PRODUCER
    inline_limit: int = INLINE_DIFF_BYTES
    # Pre-flight smoke runs refuse to start (IsolationUnavailable) with any sandbox gap.
    require_full_isolation: bool = False
    # The search's model spend so far (from its log) and what one implementer call has cost on
    # average, so no call is made that would take the search past its dollar budget.
    spent_usd: float = 0.0
    next_call_usd: float = 0.0


@dataclass(frozen=True)
class Candidate:
    diff: str
    made: Materialized
    report: PreflightReport


def environment_sources(env: Environment) -> dict[str, str]:
    """Every text file of the environment, so the applier can name protected files as such."""
    out = {}
    for rel in env.files():
        try:
            out[rel] = (env.root / rel).read_text()
        except (UnicodeDecodeError, OSError):
            continue
    return out


def check_candidate(
    env: Environment, diff: str, sources: dict[str, str], deps: ImplementerDeps, seed: int
) -> Verdict:
    """Strict apply, normalise, materialise as a runner would, pre-flight. Never raises for a
    bad diff: the Verdict says what failed, in words a model can act on."""
    m = env.manifest
    try:
        changed = (
            apply_to_sources(
                sources,
                diff,
                editable=m.editable,
                new_files=m.new_files,
                protected=env.protected_files,
            )
            if diff
            else {}
        )
    except PatchRejected as exc:
        return Verdict(False, "apply", exc.reason)
    normal = make_diff(
        {p: sources[p] for p in changed if p in sources},
        {p: t for p, t in changed.items() if t is not None},
    )
    deps.work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="patch-", dir=deps.work_dir))
    try:
        try:
            made = env.materialize(scratch / "workspace", normal)
        except PatchRejected as exc:
            return Verdict(False, "apply", exc.reason)
        report = run_preflight(
            env,
            made.path,
            made.files_changed,
            scratch=scratch / "run",
            cache_dir=deps.cache_dir / env.name,
            seed=seed,
            limits=Limits(require_full_isolation=deps.require_full_isolation),
        )
        if not report.passed:
            return Verdict(
                False, "preflight", failure_detail(report), Candidate(normal, made, report)
            )
        return Verdict(True, result=Candidate(normal, made, report))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
