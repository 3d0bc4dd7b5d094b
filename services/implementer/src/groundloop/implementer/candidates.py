"""One candidate patch checked as a runner would meet it: strict apply, normalise
(`make_diff`), materialise into a fresh workspace (Environment.materialize), pre-flight there
(preflight.py) in the runner's sandbox, full isolation required when the implementer was
started with it. A patch that needs no smoke run (a trusted knob-only one) is checked without
a workspace: its texts in memory are what the workspace would hold, so pre-flight and the
patched tree's digest are taken from them (`_checked_in_memory`), with the same results.
`ImplementerDeps` is what the implementer's handler needs from its process.
"""

from __future__ import annotations

import codecs
import locale
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from groundloop.events import ModelPrice, PreflightReport, SearchStarted
from groundloop.execution.applier import PatchRejected, apply_to_sources, make_diff
from groundloop.execution.environment import Environment, Materialized
from groundloop.execution.sandbox import Limits
from groundloop.execution.tree_digests import holds_text, patched_tree_digest, text_digest
from groundloop.implementer.llm_patch import Verdict
from groundloop.implementer.preflight import failure_detail, preflight_from_texts, run_preflight
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
class PatchFacts:
    """What a PatchReady says of the patched tree, as `Environment.materialize` finds it."""

    files_changed: list[str]
    patched_digest: str
    diff_digest: str

    @classmethod
    def of(cls, made: Materialized) -> PatchFacts:
        return cls(made.files_changed, made.patched_digest, made.diff_digest)


@dataclass(frozen=True)
class Candidate:
    diff: str
    made: PatchFacts
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
    """Strict apply, normalise, materialise as a runner would, pre-flight (a patch that needs
    no smoke run: the same from memory). Never raises for a bad diff: the Verdict says what
    failed, in words a model can act on."""
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
    candidate = _checked_in_memory(env, normal, sources)
    if candidate is None:
        try:
            candidate = _checked_in_workspace(env, normal, sources, deps, seed)
        except PatchRejected as exc:
            return Verdict(False, "apply", exc.reason)
    if not candidate.report.passed:
        return Verdict(False, "preflight", failure_detail(candidate.report), candidate)
    return Verdict(True, result=candidate)


def _checked_in_workspace(
    env: Environment, normal: str, sources: dict[str, str], deps: ImplementerDeps, seed: int
) -> Candidate:
    """Materialise as a runner would and pre-flight there (PatchRejected: it does not apply)."""
    deps.work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="patch-", dir=deps.work_dir))
    try:
        made = env.materialize(scratch / "workspace", normal)
        report = run_preflight(
            env,
            made.path,
            made.files_changed,
            scratch=scratch / "run",
            cache_dir=deps.cache_dir / env.name,
            seed=seed,
            limits=Limits(require_full_isolation=deps.require_full_isolation),
            originals=sources,
        )
        return Candidate(normal, PatchFacts.of(made), report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _checked_in_memory(env: Environment, normal: str, sources: dict[str, str]) -> Candidate | None:
    """What `_checked_in_workspace` would find, for a patch that needs no smoke run; None for
    any other patch, or whenever the workspace might hold other texts than memory does."""
    m = env.manifest
    if not m.trusted_knobs or not normal:
        return None
    try:  # the parse, policy and patching Environment.materialize applies to the same texts
        applied = apply_to_sources(
            sources,
            normal,
            editable=m.editable,
            new_files=m.new_files,
            protected=env.protected_files,
        )
    except PatchRejected:
        return None  # the workspace says why, as it always has
    after: dict[str, str] = {}
    for rel, text in applied.items():
        # Only edits of files whose bytes are exactly their text in memory, and whose new text
        # reads back from disk unchanged (pre-flight reads a workspace in the locale's encoding,
        # newlines translated); a new or deleted file is never knob-only anyway.
        if text is None or rel not in sources or not _reads_back(text):
            return None
        if not holds_text(env.root, rel, sources[rel]):
            return None
        after[rel] = text
    report = preflight_from_texts(env, {rel: sources[rel] for rel in after}, after)
    if report is None:
        return None
    facts = PatchFacts(list(after), patched_tree_digest(env.root, after), text_digest(normal))
    return Candidate(normal, facts, report)


def _reads_back(text: str) -> bool:
    """Whether `text`, written as UTF-8, reads back as itself with `Path.read_text()`."""
    return "\r" not in text and (
        text.isascii() or codecs.lookup(locale.getpreferredencoding(False)).name == "utf-8"
    )
