"""The implementer service: turns each idea into a patch that applies and passes pre-flight.

Consumes IdeaProposed. Three paths, one pre-flight (preflight.py):
- baseline ideas (mode "baseline") go through as the empty diff;
- knob ideas (IdeaProposed.knobs set) are implemented deterministically by editing the
  declared constants (knob_edit.py);
- other ideas go to the search's implementer model (llm_patch.py): S samples in parallel,
  each revising up to R times on an apply or pre-flight error; the first that passes wins.
Every candidate is applied in memory by the strict applier, normalised (`make_diff`), then
materialised into a fresh workspace exactly as a runner will (Environment.materialize) and
pre-flighted there. Emits PatchReady (the normalised diff inline, or an object-store key
when over 256 KB; digests, files changed, attempts, usage, the pre-flight report, the
manifest's resource class, seed = the manifest's first seed, patch_id =
stable_id(idea_id, "patch")) or PatchFailed (stage, last error, attempts, usage). An idea
whose search has no SearchStarted in the log yet is retried (SearchNotFound); a model that is
down is retried after 30 s, and recorded as PatchFailed on the last delivery.

`role()` declares the service for groundloop.skeleton; `await run(settings, stop)` serves it.
Run alone:  python -m groundloop.implementer   (GROUNDLOOP_NATS_URL, model keys in the environment)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from groundloop.bus import Bus, describe
from groundloop.consumer import Delivery, Retry
from groundloop.events import (
    Event,
    IdeaProposed,
    ImplementerInfo,
    ModelPrice,
    PatchFailed,
    PatchReady,
    PreflightReport,
    SearchStarted,
    Usage,
    stable_id,
)
from groundloop.execution.applier import PatchRejected, apply_to_sources, make_diff
from groundloop.execution.environment import Environment, Materialized
from groundloop.implementer.knob_edit import KnobEditError, knob_sources
from groundloop.implementer.llm_patch import Verdict, best_failure, build_prompt, implement
from groundloop.implementer.preflight import failure_detail, run_preflight
from groundloop.llm.client import ClientCache, LLMClient, LLMError, LLMSettings
from groundloop.llm.pricing import add_usage
from groundloop.settings import Settings
from groundloop.skeleton import Role, run_role

log = logging.getLogger(__name__)
PRODUCER = "implementer"
INLINE_DIFF_BYTES = 256 * 1024  # larger diffs go to the object store (events stay small)


class SearchNotFound(Retry):
    """The idea's search has no SearchStarted in the log yet (the log may still be catching up)."""

    def __init__(self, search_id: str):
        super().__init__(f"search {search_id} has no SearchStarted in the log", delay=2.0)


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


@dataclass(frozen=True)
class Candidate:
    diff: str
    made: Materialized
    report: PreflightReport


def _sources(env: Environment) -> dict[str, str]:
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
        )
        if not report.passed:
            return Verdict(
                False, "preflight", failure_detail(report), Candidate(normal, made, report)
            )
        return Verdict(True, result=Candidate(normal, made, report))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _failed(
    event: IdeaProposed,
    deps: ImplementerDeps,
    stage: str,
    error: str,
    attempts: int,
    usage: Usage | None = None,
) -> PatchFailed:
    log.warning(
        "%s: patch failed at %s after %d attempt(s): %s",
        describe(event),
        stage,
        attempts,
        error.splitlines()[0][:300] if error else "",
    )
    return event.derive(
        PatchFailed,
        deps.producer,
        idea_id=event.idea_id,
        generation=event.generation,
        attempts=attempts,
        stage=stage,
        last_error=error[-8000:],
        usage=usage or Usage(),
    )


def _ready(
    event: IdeaProposed,
    deps: ImplementerDeps,
    env: Environment,
    candidate: Candidate,
    attempts: int,
    implementer: ImplementerInfo,
    usage: Usage,
) -> PatchReady:
    patch_id = stable_id(event.idea_id, "patch")
    diff: str | None = candidate.diff
    diff_key = None
    if len(candidate.diff.encode()) > deps.inline_limit:
        if deps.put_artifact is None:
            raise RuntimeError("a diff over the inline limit needs an object store (put_artifact)")
        diff_key = deps.put_artifact(
            f"diffs/{event.search_id}/{patch_id}.diff", candidate.diff.encode()
        )
        diff = None
    m = env.manifest
    return event.derive(
        PatchReady,
        deps.producer,
        patch_id=patch_id,
        idea_id=event.idea_id,
        generation=event.generation,
        environment=env.name,
        environment_digest=env.digest(),
        resource_class=m.resource_class,
        diff=diff,
        diff_key=diff_key,
        diff_digest=candidate.made.diff_digest,
        patched_digest=candidate.made.patched_digest,
        files_changed=candidate.made.files_changed,
        attempts=attempts,
        implementer=implementer,
        usage=usage,
        preflight=candidate.report,
        seed=m.seeds[0] if m.seeds else 0,
    )


def handle(event: Event, deps: ImplementerDeps) -> list[Event]:
    if not isinstance(event, IdeaProposed):
        return []
    started = deps.search(event.search_id)
    if started is None:
        raise SearchNotFound(event.search_id)
    env = deps.environment(started.environment)
    if env.digest() != started.environment_digest:
        return [
            _failed(
                event,
                deps,
                "rejected",
                f"environment {env.name} changed since the search "
                f"started (digest {env.digest()[:12]} != {started.environment_digest[:12]}); "
                "patches against other code would not be comparable: start a new search",
                0,
            )
        ]
    seed = env.manifest.seeds[0] if env.manifest.seeds else 0
    sources = _sources(env)

    def deterministic(diff: str, kind: str) -> list[Event]:
        verdict = check_candidate(env, diff, sources, deps, seed)
        if not verdict.passed:
            return [_failed(event, deps, verdict.stage or "apply", verdict.error, 1)]
        return [_ready(event, deps, env, verdict.result, 1, ImplementerInfo(kind=kind), Usage())]  # type: ignore[arg-type]

    if event.mode == "baseline":
        return deterministic("", "none")
    if event.knobs is not None:
        try:
            after = knob_sources(env.manifest, env.editable_sources(), event.knobs)
        except KnobEditError as exc:
            return [_failed(event, deps, "rejected", str(exc), 0)]
        return deterministic(make_diff({p: sources[p] for p in after}, after), "knobs")
    return _implement_with_model(event, deps, env, started, sources, seed)


def _implement_with_model(
    event: IdeaProposed,
    deps: ImplementerDeps,
    env: Environment,
    started: SearchStarted,
    sources: dict[str, str],
    seed: int,
) -> list[Event]:
    settings = started.implementer
    if settings.kind != "llm" or not settings.model:
        return [
            _failed(
                event,
                deps,
                "model",
                "this idea has no knob settings, and the search has "
                "no implementer model: start the search with implementer kind 'llm' and a "
                "model (e.g. anthropic:claude-sonnet-4-5)",
                0,
            )
        ]
    try:
        client = deps.llm(settings.model, started.price_table or None)
    except LLMError as exc:
        if exc.retryable:
            raise
        return [_failed(event, deps, "model", str(exc), 0)]  # a missing key, a malformed model name
    prompt = build_prompt(env, event.title, event.text)
    winner, results = implement(
        client,
        prompt,
        env.editable_sources(),
        lambda diff: check_candidate(env, diff, sources, deps, seed),
        samples=settings.samples,
        revisions=settings.revisions,
    )
    usage = add_usage(*(r.usage for r in results))
    attempts = sum(r.attempts for r in results)
    if winner is not None:
        info = ImplementerInfo(kind="llm", model=client.spec.label)
        return [_ready(event, deps, env, winner.verdict.result, attempts, info, usage)]  # type: ignore[union-attr, arg-type]
    if attempts == 0:  # no answer at all: the provider is down or refuses us
        errors = [r.model_error for r in results if r.model_error is not None]
        if errors and all(e.retryable for e in errors):
            raise errors[-1]  # run() hands the idea back for a later try
    stage, error = best_failure(results)
    return [_failed(event, deps, stage, error, attempts, usage)]


# ---------------------------------------------------------------------------- the service


class ImplementerContext:
    """What one implementer process keeps between events: the searches' SearchStarted
    (read once from the log), the model clients and the scratch folder."""

    def __init__(
        self, settings: Settings, bus: Bus, llm_settings: LLMSettings | None, work_dir: Path | None
    ):
        self.settings, self.bus = settings, bus
        self.loop = asyncio.get_running_loop()
        self.searches: dict[str, SearchStarted] = {}
        self.clients = ClientCache(llm_settings)
        self.work_dir = work_dir or settings.data_dir / "implementer"

    async def find_search(self, search_id: str) -> SearchStarted | None:
        if search_id not in self.searches:
            async for event in self.bus.events(search_id):
                if isinstance(event, SearchStarted):
                    self.searches[search_id] = event
                    break
        return self.searches.get(search_id)

    def put_artifact(self, key: str, data: bytes) -> str:  # called from the handler's thread
        future = asyncio.run_coroutine_threadsafe(self.bus.put_artifact(key, data), self.loop)
        return future.result(timeout=120)

    def environment(self, name: str) -> Environment:
        return Environment.load(name, self.settings.environments_dir)


async def on_idea(event: Event, delivery: Delivery, ctx: ImplementerContext) -> list[Event]:
    if not isinstance(event, IdeaProposed):
        return []
    started = await ctx.find_search(event.search_id)
    deps = ImplementerDeps(
        search=lambda _sid: started,
        environment=ctx.environment,
        llm=ctx.clients,
        work_dir=ctx.work_dir,
        cache_dir=ctx.settings.data_dir / "cache",
        put_artifact=ctx.put_artifact,
    )
    try:
        async with delivery.heartbeat():
            return await asyncio.to_thread(handle, event, deps)
    except LLMError as exc:
        if delivery.last_attempt or not exc.retryable:
            return [_failed(event, deps, "model", str(exc), 0)]
        raise Retry(str(exc), delay=30.0) from None


def role(
    *,
    llm_settings: LLMSettings | None = None,
    concurrency: int = 2,
    work_dir: Path | None = None,
) -> Role[ImplementerContext]:
    @contextlib.asynccontextmanager
    async def context(
        settings: Settings, bus: Bus, _stop: asyncio.Event
    ) -> AsyncIterator[ImplementerContext]:
        yield ImplementerContext(settings, bus, llm_settings, work_dir)

    return Role(
        name=PRODUCER,
        consumes=(IdeaProposed,),
        deps=context,
        handle=on_idea,
        concurrency=concurrency,
    )


async def run(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    llm_settings: LLMSettings | None = None,
    concurrency: int = 2,
    work_dir: Path | None = None,
) -> None:
    role_ = role(llm_settings=llm_settings, concurrency=concurrency, work_dir=work_dir)
    await run_role(role_, settings, stop or asyncio.Event())
