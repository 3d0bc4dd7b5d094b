"""The ideator service: turns each generation's plan into ideas.

Consumes GenerationAdvanced. For every planned slot (plan.fresh, then plan.explore, then
plan.exploit) it writes one idea, either with a language model (ProposerSettings.kind "llm",
the paper's prompts, `ideas_per_call` ideas per call, the ideas already written this
generation listed to avoid) or with the offline knob proposer (kind "knobs"). Ideas that
duplicate (exactly or nearly) any earlier idea of the search are dropped, logged and counted.
Emits IdeaProposed with idea_id = stable_id(search_id, generation, slot) and an event id
derived from the GenerationAdvanced and the slot, so a redelivery re-publishes the same ids.
For "rl" searches the rl-trainer writes the ideas; the ideator emits nothing.

The search's history (SearchStarted, ideas and their results) is folded from the log by
`on_generation` and handed to `handle` through IdeatorDeps, so tests need no broker. A search
whose SearchStarted is not in the log yet is retried (SearchNotStarted); one the ideator can
never serve is rejected (IdeatorError); a model that is down is retried after 30 s.

`role()` declares the service for groundloop.skeleton; `await run(settings, stop)` serves it.
Run alone:  python -m groundloop.ideator   (GROUNDLOOP_NATS_URL, model keys in the environment)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from groundloop.bus import Bus, describe
from groundloop.consumer import Delivery, Reject, Retry
from groundloop.events import (
    Event,
    GenerationAdvanced,
    IdeaProposed,
    ModelPrice,
    ProposerInfo,
    SearchStarted,
    Usage,
    stable_id,
)
from groundloop.execution.environment import Environment
from groundloop.ideator.history import IdeaRecord, SearchHistory
from groundloop.ideator.knobs import KnobProposer
from groundloop.ideator.parsing import DuplicateFilter, ParsedIdea, parse_ideas
from groundloop.ideator.prompts import SYSTEM, build_prompt, prompt_digest
from groundloop.llm.client import ClientCache, LLMClient, LLMError, LLMSettings
from groundloop.llm.pricing import add_usage
from groundloop.settings import Settings
from groundloop.skeleton import Role, run_role

log = logging.getLogger(__name__)
PRODUCER = "ideator"


class IdeatorError(Reject):
    """A search the ideator can never serve as configured (no model named, no knobs…)."""


class SearchNotStarted(Retry):
    """The search's SearchStarted is not in the log yet (the log may still be catching up)."""

    def __init__(self, search_id: str):
        super().__init__(f"search {search_id} has no SearchStarted in the log", delay=2.0)


@dataclass
class IdeatorDeps:
    history: SearchHistory
    environment: Callable[[str], Environment]  # name -> Environment
    llm: Callable[[str, dict[str, ModelPrice] | None], LLMClient]  # model spec, prices -> client
    producer: str = PRODUCER
    duplicate_threshold: float = 0.9  # dropping a distinct idea costs more than keeping a near one
    extra_calls: int = 2  # calls beyond ceil(count / ideas_per_call) to make up for drops


@dataclass
class Generated:
    events: list[IdeaProposed] = field(default_factory=list)
    dropped: int = 0  # duplicates (and knob slots with no untried setting)
    calls: int = 0
    unfilled: int = 0  # planned slots left without an idea


def _slots(event: GenerationAdvanced) -> list[tuple[str, int, int, list[str]]]:
    """(mode, first slot, count, context ids) in the plan's order."""
    plan, out, start = event.plan, [], 0
    for mode, count, context in (
        ("fresh", plan.fresh, []),
        ("explore", plan.explore, plan.explore_context_ids),
        ("exploit", plan.exploit, plan.exploit_context_ids),
    ):
        out.append((mode, start, count, list(context)))
        start += count
    return out


def _idea_event(
    cause: GenerationAdvanced, deps: IdeatorDeps, slot: int, mode: str, **fields
) -> IdeaProposed:
    return cause.derive(
        IdeaProposed,
        deps.producer,
        slot,
        idea_id=stable_id(cause.search_id, cause.generation, slot),
        generation=cause.generation,
        mode=mode,
        **fields,
    )


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
    return _propose_llm(event, deps, env, started)


def handle(event: Event, deps: IdeatorDeps) -> list[Event]:
    if not isinstance(event, GenerationAdvanced):
        return []
    result = propose(event, deps)
    log.info(
        "%s: generation %d: %d ideas, %d duplicates dropped, %d slots unfilled, %d model calls",
        describe(event),
        event.generation,
        len(result.events),
        result.dropped,
        result.unfilled,
        result.calls,
    )
    return list(result.events)


# ---------------------------------------------------------------------------- knobs


def _propose_knobs(
    event: GenerationAdvanced, deps: IdeatorDeps, env: Environment, started: SearchStarted
) -> Generated:
    try:
        proposer = KnobProposer(env.manifest, deps.history, started.seed, event.generation)
    except ValueError as exc:
        raise IdeatorError(f"{env.name}: {exc}") from None
    out = Generated()
    for mode, start, count, context in _slots(event):
        for slot in range(start, start + count):
            idea = proposer.propose(slot, mode, context)
            if idea is None:
                out.dropped += 1
                out.unfilled += 1
                log.info("%s: slot %d: no untried knob setting found", describe(event), slot)
                continue
            out.events.append(
                _idea_event(
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
    return out


# ---------------------------------------------------------------------------- language models


def split_usage(usage: Usage, parts: int) -> list[Usage]:
    """`usage` shared over `parts` ideas; the shares add up to it exactly (calls to the first)."""

    def share(total: int, i: int) -> int:
        return total // parts + (1 if i < total % parts else 0)

    return [
        Usage(
            calls=usage.calls if i == 0 else 0,
            input_tokens=share(usage.input_tokens, i),
            output_tokens=share(usage.output_tokens, i),
            cost_usd=usage.cost_usd / parts,
        )
        for i in range(parts)
    ]


def _context(history: SearchHistory, mode: str, ids: list[str], limit: int) -> list[IdeaRecord]:
    if mode == "exploit":
        return history.ranked(ids)[:limit]  # best first, with scores
    if mode == "explore":
        return history.records(ids)[:limit]  # everything tried, failures included
    return []


@dataclass
class _Round:
    """One generation's model calls: the duplicate filter, the titles written so far, and the
    cost of calls not yet attributed to an idea."""

    event: GenerationAdvanced
    client: LLMClient
    seen: DuplicateFilter
    out: Generated
    written: list[str] = field(default_factory=list)
    unspent: Usage = field(default_factory=Usage)

    def ask(
        self, prompt: str, wanted: int, thinking_budget: int | None
    ) -> list[tuple[ParsedIdea, str, Usage]]:
        """Up to `wanted` new ideas from one call, each with the prompt digest and its share of
        the cost (this call's and that of fruitless calls before it)."""
        completion = self.client.complete(
            [{"role": "user", "content": prompt}], system=SYSTEM, thinking_budget=thinking_budget
        )
        self.out.calls += 1
        self.unspent = add_usage(self.unspent, completion.usage)
        parsed = parse_ideas(completion.text)
        if not parsed:
            log.warning(
                "%s: a call gave no parsable ideas (starts %r)",
                describe(self.event),
                completion.text[:200],
            )
        fresh: list[ParsedIdea] = []
        for idea in parsed:
            if len(fresh) >= wanted:
                break  # surplus ideas are not duplicates: they are simply unused
            why = self.seen.admit(idea.text)
            if why is not None:
                self.out.dropped += 1
                log.info("%s: dropped %r: %s", describe(self.event), idea.title, why)
                continue
            fresh.append(idea)
            self.written.append(idea.title)
        if not fresh:
            return []
        digest, shares = prompt_digest(SYSTEM, prompt), split_usage(self.unspent, len(fresh))
        self.unspent = Usage()
        return [(idea, digest, share) for idea, share in zip(fresh, shares, strict=True)]


def _propose_llm(
    event: GenerationAdvanced, deps: IdeatorDeps, env: Environment, started: SearchStarted
) -> Generated:
    settings, history = started.proposer, deps.history
    client = deps.llm(settings.model, started.price_table or None)  # type: ignore[arg-type]
    seen = DuplicateFilter((r.text for r in history.proposed()), deps.duplicate_threshold)
    round_ = _Round(event, client, seen, Generated())
    description = env.describe_for_prompt()
    for mode, start, count, context_ids in _slots(event):
        context = _context(history, mode, context_ids, started.config.context_size)
        accepted: list[tuple[ParsedIdea, str, Usage]] = []
        max_calls = math.ceil(count / settings.ideas_per_call) + deps.extra_calls if count else 0
        for _ in range(max_calls):
            wanted = count - len(accepted)
            if wanted <= 0:
                break
            prompt = build_prompt(
                environment=description,
                metric=env.manifest.metric,
                mode=mode,
                count=min(settings.ideas_per_call, wanted),
                context=context,
                baseline_score=history.baseline_score,
                written_this_generation=round_.written,
            )
            accepted += round_.ask(prompt, wanted, settings.thinking_budget)
        round_.out.unfilled += count - len(accepted)
        parents = [r.idea_id for r in context] if mode == "exploit" else []
        for offset, (idea, digest, usage) in enumerate(accepted):
            round_.out.events.append(
                _idea_event(
                    event,
                    deps,
                    start + offset,
                    mode,
                    parent_ids=parents,
                    title=idea.title,
                    text=idea.text,
                    proposer=ProposerInfo(kind="llm", model=client.spec.label),
                    prompt_digest=digest,
                    usage=usage,
                )
            )
    out, unspent = round_.out, round_.unspent
    if unspent.calls and out.events:  # calls that yielded nothing still cost money: keep the total
        last = out.events[-1]
        out.events[-1] = last.model_copy(update={"usage": add_usage(last.usage, unspent)})
    elif unspent.calls:
        log.warning(
            "%s: %d model calls ($%.4f) produced no usable idea",
            describe(event),
            unspent.calls,
            unspent.cost_usd,
        )
    return out


# ---------------------------------------------------------------------------- the service


@dataclass(frozen=True)
class IdeatorContext:
    """What one ideator process keeps between events; the history is read per event."""

    bus: Bus
    settings: Settings
    clients: ClientCache

    def environment(self, name: str) -> Environment:
        return Environment.load(name, self.settings.environments_dir)


async def on_generation(event: Event, delivery: Delivery, ctx: IdeatorContext) -> list[Event]:
    if not isinstance(event, GenerationAdvanced):
        return []
    history = SearchHistory.from_events(
        event.search_id, [e async for e in ctx.bus.events(event.search_id)]
    )
    deps = IdeatorDeps(history=history, environment=ctx.environment, llm=ctx.clients)
    try:
        async with delivery.heartbeat():
            return await asyncio.to_thread(handle, event, deps)
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
