"""The ideator service: turns each generation's plan into ideas.

Consumes GenerationAdvanced. For every planned slot (plan.fresh, then plan.explore, then
plan.exploit) it writes one idea, either with a language model (ProposerSettings.kind "llm",
`llm_proposer`: the paper's prompts, `ideas_per_call` ideas per call, the ideas already
written this generation listed to avoid) or with the offline knob proposer (kind "knobs"). Ideas that
duplicate (exactly or nearly) any earlier idea of the search are dropped, logged and counted.
Model calls ask for structured output (`prompts.idea_schema`; a server that refuses it is asked
in plain text) and answers are parsed in any accepted shape (`parsing.parse_ideas_report`),
template echoes rejected with their reason in the log. A call that yields fewer ideas than
asked is followed by calls for the missing ones (`IdeatorDeps.extra_calls` beyond the
ceil(count / ideas_per_call) needed); a generation still short gets IdeasShortfall, so the
evolver closes it on the ideas it has instead of waiting for its deadline. A model that is
unreachable, not served, cannot answer within its timeout, or has no key would fail every
call: the ideator emits SearchStopped with the error instead of retrying.
Emits IdeaProposed with idea_id = stable_id(search_id, generation, slot) and an event id
derived from the GenerationAdvanced and the slot, so a redelivery re-publishes the same ids.
Each idea is published as soon as it is written (`generation.stream`; the last one with the
handler's return, since it carries the cost of fruitless calls), so a generation's first
ideas are patched and run while the rest are still being written; a redelivery writes only
the slots that have no idea in the log yet.
For "rl" searches the rl-trainer writes the ideas; the ideator emits nothing.

The search's history (SearchStarted, ideas and their results) is folded from the log by
`on_generation` (each entry read once, by the process's follower of the search) and handed
to `handle` through IdeatorDeps, so tests need no broker. A search whose SearchStarted is
not in the log yet is retried (SearchNotStarted); one the ideator can never serve
(IdeatorError) is stopped (SearchStopped); a provider error worth retrying (rate limits, 5xx
after the client's own retries) is retried after 30 s, but never once the log holds the
search's SearchCompleted or SearchStopped.

`role()` declares the service for groundloop.skeleton; `await run(settings, stop)` serves it.
Run alone:  python -m groundloop.ideator   (GROUNDLOOP_NATS_URL, model keys in the environment)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from groundloop.bus import Bus, describe
from groundloop.consumer import Delivery, Reject, Retry
from groundloop.events import (
    Event,
    GenerationAdvanced,
    IdeasShortfall,
    ProposerInfo,
    SearchStarted,
)
from groundloop.execution.environment import Environment
from groundloop.ideator.emitter import OrderedEmitter
from groundloop.ideator.endings import LLM_STOPS, search_stopped, shortfall_reason
from groundloop.ideator.followed_log import FittingLog as FittingLog
from groundloop.ideator.followed_log import known_at as known_at
from groundloop.ideator.generation import PRODUCER as PRODUCER
from groundloop.ideator.generation import Generated as Generated
from groundloop.ideator.generation import IdeatorDeps as IdeatorDeps
from groundloop.ideator.generation import SeenIdeas, idea_event, open_slots, plan_slots, stream
from groundloop.ideator.knobs import KnobProposer
from groundloop.ideator.llm_proposer import propose_llm
from groundloop.ideator.llm_proposer import split_usage as split_usage
from groundloop.llm.client import ClientCache, LLMError, LLMSettings
from groundloop.log_follower import LogFollowers
from groundloop.settings import Settings
from groundloop.skeleton import Role, run_role

log = logging.getLogger(__name__)


class IdeatorError(Reject):
    """A search the ideator can never serve as configured (no model named, no knobs…)."""


# Failures that the same settings meet on every call: the search stops, saying why.
STOPS_SEARCH: tuple[type[Exception], ...] = (IdeatorError, *LLM_STOPS)


class SearchNotStarted(Retry):
    """The search's SearchStarted is not in the log yet (the log may still be catching up)."""

    def __init__(self, search_id: str):
        super().__init__(f"search {search_id} has no SearchStarted in the log", delay=2.0)


def _started(deps: IdeatorDeps) -> SearchStarted:
    if deps.history.started is None:
        raise SearchNotStarted(deps.history.search_id)
    return deps.history.started


def propose(event: GenerationAdvanced, deps: IdeatorDeps) -> Generated:
    started = _started(deps)
    settings = started.proposer
    if settings.kind == "rl":
        log.info("%s: rl search; the rl-trainer writes its ideas", describe(event))
        return Generated()
    env = deps.environment(started.environment)
    if env.digest() != started.environment_digest:
        log.warning(
            "%s: environment %s changed since the search started; ideas describe the current code",
            describe(event),
            env.name,
        )
    if settings.kind == "knobs":
        return _propose_knobs(event, deps, env, started)
    if not settings.model:
        raise IdeatorError("proposer kind 'llm' needs a model, e.g. anthropic:claude-sonnet-4-5")
    return propose_llm(event, deps, env, started)


def handle(event: Event, deps: IdeatorDeps) -> list[Event]:
    if not isinstance(event, GenerationAdvanced):
        return []
    try:
        result = propose(event, deps)
    except STOPS_SEARCH as exc:
        log.error("%s: the search cannot go on: %s", describe(event), exc)
        return [search_stopped(event, deps.producer, exc)]
    log.info(
        "%s: generation %d: %d ideas, %d duplicates dropped, %d slots unfilled, %d model calls",
        describe(event),
        event.generation,
        len(result.events),
        result.dropped,
        result.unfilled,
        result.calls,
    )
    out: list[Event] = list(result.pending())  # the others went out as they were written
    if result.unfilled > 0:
        planned = event.plan.fresh + event.plan.explore + event.plan.exploit
        out.append(
            event.derive(
                IdeasShortfall,
                deps.producer,
                -1,  # idea events use the slots 0..planned-1
                generation=event.generation,
                planned=planned,
                proposed=len(result.events) + result.already,
                reason=result.budget_stop
                or shortfall_reason(
                    result.calls, result.empty_calls, result.rejected, result.dropped
                ),
            )
        )
    return out


# ---------------------------------------------------------------------------- knobs


def _propose_knobs(
    event: GenerationAdvanced, deps: IdeatorDeps, env: Environment, started: SearchStarted
) -> Generated:
    try:
        proposer = KnobProposer(env.manifest, deps.history, started.seed, event.generation)
    except ValueError as exc:
        raise IdeatorError(f"{env.name}: {exc}") from None
    out = Generated()
    for mode, start, count, context in plan_slots(event):
        slots = open_slots(event, deps, start, count)
        out.already += count - len(slots)
        for slot in slots:
            idea = proposer.propose(slot, mode, context)
            if idea is None:
                out.dropped += 1
                out.unfilled += 1
                log.info("%s: slot %d: no untried knob setting found", describe(event), slot)
                continue
            out.events.append(
                idea_event(
                    event,
                    deps,
                    slot,
                    mode,
                    parent_ids=idea.parent_ids,
                    title=idea.title,
                    text=idea.text,
                    proposer=ProposerInfo(kind="knobs"),
                    knobs=idea.knobs,
                )
            )
            stream(out, deps)
    return out


# ---------------------------------------------------------------------------- the service


class IdeatorContext:
    """What one ideator process keeps between events: the searches' logs, followed (each
    entry read once, not the whole log per generation), and the model clients."""

    def __init__(self, bus: Bus, settings: Settings, clients: ClientCache):
        self.bus, self.settings, self.clients = bus, settings, clients
        self.logs = LogFollowers(bus, FittingLog)
        self.seen_ideas = SeenIdeas()

    def environment(self, name: str) -> Environment:
        return Environment.load(name, self.settings.environments_dir)


async def on_generation(event: Event, delivery: Delivery, ctx: IdeatorContext) -> list[Event]:
    if not isinstance(event, GenerationAdvanced):
        return []
    # Only what fits the log: a forged result must not steer the search's ideas. The log as
    # it is now; the history is a copy, for the follower goes on folding while the ideas are
    # written.
    fold = await ctx.logs.to_end(event.search_id)
    if fold.ended is not None:  # a retried delivery of a search that is over: nothing to write
        log.info(
            "%s: search %s already ended (%s)", describe(event), event.search_id, fold.ended.TYPE
        )
        return []
    history = fold.history_at(event, delivery.seq)
    emitter = OrderedEmitter(ctx.bus)
    deps = IdeatorDeps(
        history=history,
        environment=ctx.environment,
        llm=ctx.clients,
        spent_usd=fold.spent_usd,  # spend: the latest
        ideator_calls=fold.ideator_calls,
        ideator_usd=fold.ideator_usd,
        emit=emitter.submit,
        seen_ideas=ctx.seen_ideas,
    )
    try:
        async with delivery.heartbeat():
            try:
                return await asyncio.to_thread(handle, event, deps)
            finally:  # the ideas streamed so far precede the ones returned, or the error
                await emitter.drain()
    except LLMError as exc:
        if exc.retryable:
            raise Retry(str(exc), delay=30.0) from None
        raise Reject(str(exc)) from None


def role(*, llm_settings: LLMSettings | None = None, concurrency: int = 2) -> Role[IdeatorContext]:
    @contextlib.asynccontextmanager
    async def context(
        settings: Settings, bus: Bus, _stop: asyncio.Event
    ) -> AsyncIterator[IdeatorContext]:
        yield IdeatorContext(bus, settings, ClientCache(llm_settings))

    return Role(
        name=PRODUCER,
        consumes=(GenerationAdvanced,),
        deps=context,
        handle=on_generation,
        concurrency=concurrency,
    )


async def run(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    llm_settings: LLMSettings | None = None,
    concurrency: int = 2,
) -> None:
    role_ = role(llm_settings=llm_settings, concurrency=concurrency)
    await run_role(role_, settings, stop or asyncio.Event())
