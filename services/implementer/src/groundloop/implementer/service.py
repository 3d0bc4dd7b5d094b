"""The implementer service: turns each idea into a patch that applies and passes pre-flight.

Consumes IdeaProposed. Three paths, one pre-flight (preflight.py):
- baseline ideas (mode "baseline") go through as the empty diff;
- knob ideas (IdeaProposed.knobs set) are implemented deterministically by editing the
  declared constants (knob_edit.py);
- other ideas go to the search's implementer model (llm_patch.py): S samples in parallel,
  each revising up to R times on an apply or pre-flight error; the first that passes wins.
Every candidate is applied in memory by the strict applier, normalised (`make_diff`), then
materialised into a fresh workspace exactly as a runner will (Environment.materialize) and
pre-flighted there (candidates.py), in the runners' sandbox: its protections on this host
are logged at start-up, and with `require_full_isolation` (--require-full-isolation) the
implementer refuses to start with any gap, and smoke runs refuse to run with one. Emits
(outcomes.py) PatchReady (the normalised diff inline, or an object-store key
when over 256 KB; digests, files changed, attempts, usage, the pre-flight report, the
manifest's resource class, seed = the manifest's first seed, patch_id =
stable_id(idea_id, "patch")) or PatchFailed (stage, last error, attempts, usage). An idea
whose search has no SearchStarted before it in the log is refused (quarantined, dead-lettered:
groundloop.search_index reads the log up to the idea's own stream sequence, so a lagging
log never refuses a real idea); `handle` alone retries it (SearchNotFound). The edit format
is ImplementerSettings.edit_format, or by default the one that suits the model's strength
(`edit_formats.default_edit_format`: whole files for local or small models). A model that is
unreachable or not served would fail every idea: the idea gets PatchFailed and the
search SearchStopped (one per search: a stable event id), and later ideas of that search are
failed at once without calling the model. A provider error worth retrying is retried after
30 s, and recorded as PatchFailed on the last delivery.

`role()` declares the service for groundloop.skeleton; `await run(settings, stop)` serves it.
Run alone:  python -m groundloop.implementer   (GROUNDLOOP_NATS_URL, model keys in the environment)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from groundloop import telemetry
from groundloop.bus import Bus
from groundloop.consumer import Delivery, Reject, Retry
from groundloop.events import (
    Event,
    IdeaProposed,
    ImplementerInfo,
    PatchFailed,
    PatchReady,
    SearchStarted,
    SearchStopped,
    Usage,
)
from groundloop.execution.applier import make_diff
from groundloop.execution.bubblewrap import (
    IsolationUnavailable,
    host_protections,
    isolation_gaps,
    require_full_isolation,
)
from groundloop.execution.environment import Environment
from groundloop.implementer.budgeted import BudgetedClient
from groundloop.implementer.candidates import INLINE_DIFF_BYTES as INLINE_DIFF_BYTES
from groundloop.implementer.candidates import PRODUCER as PRODUCER
from groundloop.implementer.candidates import Candidate as Candidate
from groundloop.implementer.candidates import ImplementerDeps as ImplementerDeps
from groundloop.implementer.candidates import check_candidate as check_candidate
from groundloop.implementer.candidates import environment_sources
from groundloop.implementer.knob_edit import KnobEditError, knob_sources
from groundloop.implementer.llm_patch import (
    Verdict,
    best_failure,
    build_prompt,
    default_edit_format,
    implement,
)
from groundloop.implementer.outcomes import STOPS_SEARCH as STOPS_SEARCH
from groundloop.implementer.outcomes import model_failed, patch_failed, patch_ready
from groundloop.implementer.outcomes import search_stopped as search_stopped
from groundloop.llm.client import ClientCache, LLMError, LLMSettings
from groundloop.llm.errors import DollarBudgetSpent
from groundloop.llm.pricing import add_usage, check_dollar_budget, spent_usd
from groundloop.log_follower import LogFollowers
from groundloop.quarantine import Quarantined
from groundloop.search_index import LogIndex, SearchFold
from groundloop.settings import Settings
from groundloop.skeleton import Role, run_role

log = logging.getLogger(__name__)
# Ideas implemented at once. Each spends most of its time waiting (on the model, on its smoke
# run's process); with two at a time a generation's first patches reached eight idle run
# slots only two by two (issue 15: slots idle while a generation opens).
IDEAS_AT_ONCE = 6


class SearchNotFound(Retry):
    """The idea's search has no SearchStarted in the log yet (the log may still be catching up)."""

    def __init__(self, search_id: str):
        super().__init__(f"search {search_id} has no SearchStarted in the log", delay=2.0)


def handle(event: Event, deps: ImplementerDeps) -> list[Event]:
    if not isinstance(event, IdeaProposed):
        return []
    started = deps.search(event.search_id)
    if started is None:
        raise SearchNotFound(event.search_id)
    env = deps.environment(started.environment)
    if env.digest() != started.environment_digest:
        return [
            patch_failed(
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
    sources = environment_sources(env)

    def deterministic(diff: str, kind: Literal["none", "knobs"]) -> list[Event]:
        verdict = _checked(env, diff, sources, deps, seed)
        if not verdict.passed:
            return [patch_failed(event, deps, verdict.stage or "apply", verdict.error, 1)]
        assert isinstance(verdict.result, Candidate)  # a passing check carries its candidate
        info = ImplementerInfo(kind=kind)
        return [patch_ready(event, deps, env, verdict.result, 1, info, Usage())]

    if event.mode == "baseline":
        return deterministic("", "none")
    if event.knobs is not None:
        try:
            after = knob_sources(env.manifest, env.editable_sources(), event.knobs)
        except KnobEditError as exc:
            return [patch_failed(event, deps, "rejected", str(exc), 0)]
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
            patch_failed(
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
        return model_failed(event, deps, exc)  # a missing key, a malformed model name
    budget = started.config.budgets.dollars
    try:
        check_dollar_budget(budget, deps.spent_usd, deps.next_call_usd)
    except DollarBudgetSpent as exc:  # the idea fails; the evolver ends the search on budget
        return [patch_failed(event, deps, "rejected", str(exc), 0)]
    if budget is not None:  # every further call is checked too (samples × revisions)
        client = BudgetedClient(client, budget, deps.spent_usd, deps.next_call_usd)
    fmt = settings.edit_format or default_edit_format(settings.model)
    prompt = build_prompt(env, event.title, event.text, fmt)
    with telemetry.step("implement with model", model=settings.model, edit_format=fmt):
        winner, results = implement(
            client,
            prompt,
            env.editable_sources(),
            # implement's thread pool does not inherit the trace context: carry it
            telemetry.carried(lambda diff: _checked(env, diff, sources, deps, seed)),
            samples=settings.samples,
            revisions=settings.revisions,
            edit_format=fmt,
        )
    usage = add_usage(*(r.usage for r in results))
    attempts = sum(r.attempts for r in results)
    if winner is not None:
        info = ImplementerInfo(kind="llm", model=client.spec.label)
        return [patch_ready(event, deps, env, winner.verdict.result, attempts, info, usage)]  # type: ignore[union-attr, arg-type]
    spent = [r.model_error for r in results if isinstance(r.model_error, DollarBudgetSpent)]
    if spent and winner is None:
        return [patch_failed(event, deps, "rejected", str(spent[0]), attempts, usage)]
    if attempts == 0:  # no answer at all: the provider is down or refuses us
        errors = [r.model_error for r in results if r.model_error is not None]
        if errors and all(e.retryable for e in errors):
            raise errors[-1]  # run() hands the idea back for a later try
        stopping = [e for e in errors if isinstance(e, STOPS_SEARCH)]
        if stopping:
            return model_failed(event, deps, stopping[-1])
    stage, error = best_failure(results)
    return [patch_failed(event, deps, stage, error, attempts, usage)]


def _checked(
    env: Environment, diff: str, sources: dict[str, str], deps: ImplementerDeps, seed: int
) -> Verdict:
    """check_candidate (apply, materialise, pre-flight) in a span saying how it went."""
    with telemetry.step("check candidate") as span:
        verdict = check_candidate(env, diff, sources, deps, seed)
        span.set_attributes(
            {"groundloop.passed": verdict.passed, "groundloop.stage": verdict.stage or ""}
        )
        return verdict


# ---------------------------------------------------------------------------- the service


class FollowedSearch(SearchFold):
    """What the implementer reads of a search's log, folded as the log is written: what fits
    it (for `LogIndex`), its SearchStarted, and what its model calls cost."""

    def __init__(self, search_id: str):
        super().__init__(search_id)
        self.started: SearchStarted | None = None  # the first in the log
        self.spent_usd = 0.0  # `spent_usd` of every event so far, summed in log order
        self.patch_calls, self.patch_usd = 0, 0.0  # of PatchReady and PatchFailed

    def add(self, seq: int, entry: Event | Quarantined) -> None:
        super().add(seq, entry)
        if isinstance(entry, Quarantined):
            return
        if isinstance(entry, SearchStarted) and self.started is None:
            self.started = entry
        self.spent_usd += spent_usd([entry])
        if isinstance(entry, PatchReady | PatchFailed):
            self.patch_calls += entry.usage.calls
            self.patch_usd += entry.usage.cost_usd


class ImplementerContext:
    """What one implementer process keeps between events: the searches' logs, followed
    (each entry read once), the model clients, the scratch folder, and whether pre-flight
    smoke runs must be fully isolated."""

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        llm_settings: LLMSettings | None,
        work_dir: Path | None,
        require_full_isolation: bool = False,
    ):
        self.settings, self.bus = settings, bus
        self.require_full_isolation = require_full_isolation
        self.loop = asyncio.get_running_loop()
        self.logs = LogFollowers(bus, FollowedSearch)
        self.log_index = LogIndex(bus, self.logs)  # does the idea fit its search's log?
        self.stopped: dict[str, str] = {}  # search id -> why this process stopped it
        self.clients = ClientCache(llm_settings)
        self.work_dir = work_dir or settings.data_dir / "implementer"

    async def find_search(self, search_id: str, seq: int) -> SearchStarted | None:
        """The search's SearchStarted, if the log has one up to stream sequence `seq`."""
        return (await self.logs.through(search_id, seq)).started

    async def spend(self, search_id: str, started: SearchStarted | None) -> tuple[float, float]:
        """(dollars spent by the search's model calls, mean cost of one implementer call), from
        the log as it is now; only when the search has a dollar budget."""
        if started is None or started.config.budgets.dollars is None:
            return 0.0, 0.0
        followed = await self.logs.to_end(search_id)
        calls = followed.patch_calls
        return followed.spent_usd, (followed.patch_usd / calls if calls else 0.0)

    def put_artifact(self, key: str, data: bytes) -> str:  # called from the handler's thread
        future = asyncio.run_coroutine_threadsafe(self.bus.put_artifact(key, data), self.loop)
        return future.result(timeout=120)

    def environment(self, name: str) -> Environment:
        return Environment.load(name, self.settings.environments_dir)


async def on_idea(event: Event, delivery: Delivery, ctx: ImplementerContext) -> list[Event]:
    if not isinstance(event, IdeaProposed):
        return []
    if (why := await ctx.log_index.refusal(event, delivery.seq)) is not None:
        raise Reject(f"not implemented: {why}")
    started = await ctx.find_search(event.search_id, delivery.seq)
    stopped = ctx.stopped.get(event.search_id)
    spent, next_call = await ctx.spend(event.search_id, started)
    deps = ImplementerDeps(
        search=lambda _sid: started,
        environment=ctx.environment,
        llm=ctx.clients,
        work_dir=ctx.work_dir,
        cache_dir=ctx.settings.data_dir / "cache",
        put_artifact=ctx.put_artifact,
        require_full_isolation=ctx.require_full_isolation,
        spent_usd=spent,
        next_call_usd=next_call,
    )
    if stopped is not None:  # the same model would fail this idea too: say so, call nothing
        return [patch_failed(event, deps, "model", f"the search was stopped: {stopped}", 0)]
    try:
        async with delivery.heartbeat():
            out = await asyncio.to_thread(handle, event, deps)
    except LLMError as exc:
        if delivery.last_attempt or not exc.retryable:
            out = model_failed(event, deps, exc)
        else:
            raise Retry(str(exc), delay=30.0) from None
    for stop in (e for e in out if isinstance(e, SearchStopped)):
        ctx.stopped[event.search_id] = stop.reason
    return out


def check_isolation(protections: dict[str, str], required: bool) -> None:
    """Log the sandbox `protections` pre-flight smoke runs get on this host (host_protections);
    SystemExit naming every gap when full isolation is `required` and the host falls short."""
    log.info("sandbox protections for pre-flight smoke runs: %s", protections)
    if gaps := isolation_gaps(protections):
        log.warning(
            "pre-flight smoke runs are NOT fully isolated on this host "
            "(--require-full-isolation would refuse to start): %s",
            "; ".join(gaps),
        )
    if required:
        try:
            require_full_isolation()
        except IsolationUnavailable as exc:
            raise SystemExit(f"implementer refuses to start: {exc}") from exc


def role(
    *,
    llm_settings: LLMSettings | None = None,
    concurrency: int = IDEAS_AT_ONCE,
    work_dir: Path | None = None,
    require_full_isolation: bool = False,
) -> Role[ImplementerContext]:
    """The implementer on the bus. Pre-flight smoke runs use the runners' sandbox: its
    protections on this host are logged at start-up (a WARNING names every gap), and with
    `require_full_isolation` the implementer refuses to start (SystemExit) with any gap."""

    @contextlib.asynccontextmanager
    async def context(
        settings: Settings, bus: Bus, _stop: asyncio.Event
    ) -> AsyncIterator[ImplementerContext]:
        protections = await asyncio.to_thread(host_protections)  # probes bwrap: seconds
        check_isolation(protections, require_full_isolation)
        yield ImplementerContext(settings, bus, llm_settings, work_dir, require_full_isolation)

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
    concurrency: int = IDEAS_AT_ONCE,
    work_dir: Path | None = None,
    require_full_isolation: bool = False,
) -> None:
    role_ = role(
        llm_settings=llm_settings,
        concurrency=concurrency,
        work_dir=work_dir,
        require_full_isolation=require_full_isolation,
    )
    await run_role(role_, settings, stop or asyncio.Event())
