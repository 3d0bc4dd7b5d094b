"""The ideator's language-model proposer: each planned slot's idea written by the search's
model with the paper's prompts, `ideas_per_call` ideas per call, the ideas already written
this generation listed to avoid, duplicates of earlier ideas dropped, and calls repeated for
ideas missing (up to `IdeatorDeps.extra_calls` more). Each call's ideas are published as soon
as they are parsed (`generation.stream`), all but the generation's last. Every call's cost is shared over the
ideas it yielded; calls that yielded nothing are charged to the generation's last idea.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from groundloop.bus import describe
from groundloop.events import GenerationAdvanced, ProposerInfo, SearchStarted, Usage
from groundloop.execution.environment import Environment
from groundloop.ideator.generation import (
    Generated,
    IdeatorDeps,
    idea_event,
    open_slots,
    plan_slots,
    stream,
)
from groundloop.ideator.history import IdeaRecord, SearchHistory
from groundloop.llm.client import LLMClient
from groundloop.llm.duplicates import DuplicateFilter
from groundloop.llm.errors import DollarBudgetSpent
from groundloop.llm.idea_parsing import ParsedIdea, parse_ideas_report
from groundloop.llm.idea_prompts import SYSTEM, build_prompt, idea_schema, prompt_digest
from groundloop.llm.pricing import add_usage, check_dollar_budget

# Logs under the service's name: one component to operators.
log = logging.getLogger("groundloop.ideator.service")


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
    spent_usd: float = 0.0  # every call of this generation, attributed to an idea or not

    def ask(
        self, prompt: str, wanted: int, thinking_budget: int | None, structured: bool
    ) -> list[tuple[ParsedIdea, str, Usage]]:
        """Up to `wanted` new ideas from one call, each with the prompt digest and its share of
        the cost (this call's and that of fruitless calls before it)."""
        completion = self.client.complete(
            [{"role": "user", "content": prompt}],
            system=SYSTEM,
            thinking_budget=thinking_budget,
            response_format=idea_schema(wanted) if structured else None,
        )
        self.out.calls += 1
        self.spent_usd += completion.usage.cost_usd
        self.unspent = add_usage(self.unspent, completion.usage)
        report = parse_ideas_report(completion.text)
        parsed = report.ideas
        self.out.rejected += len(report.rejected)
        for why in report.rejected:
            log.warning("%s: rejected idea %s", describe(self.event), why)
        if not parsed:
            self.out.empty_calls += 1
            log.warning(
                "%s: a call gave no parsable ideas (shape %s; starts %r)",
                describe(self.event),
                report.shape,
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


def _check_budget(deps: IdeatorDeps, started: SearchStarted, round_: _Round) -> None:
    """Before each call: would it take the search past its dollar budget? The next call is
    expected to cost what the ideator's calls have cost on average so far."""
    spent_here = round_.spent_usd
    calls = deps.ideator_calls + round_.out.calls
    mean = (deps.ideator_usd + spent_here) / calls if calls else 0.0
    check_dollar_budget(started.config.budgets.dollars, deps.spent_usd + spent_here, mean)


def propose_llm(
    event: GenerationAdvanced, deps: IdeatorDeps, env: Environment, started: SearchStarted
) -> Generated:
    settings, history = started.proposer, deps.history
    client = deps.llm(settings.model, started.price_table or None)  # type: ignore[arg-type]
    texts = [r.text for r in history.proposed()]
    if deps.seen_ideas is not None:
        seen = deps.seen_ideas.filter(history.search_id, texts, deps.duplicate_threshold)
    else:
        seen = DuplicateFilter(texts, deps.duplicate_threshold)
    round_ = _Round(event, client, seen, Generated())
    description = env.describe_for_prompt()
    written_before = [r.title for r in history.ideas.values() if r.generation == event.generation]
    round_.written.extend(written_before)  # a redelivery: ideas an earlier one published
    for mode, start, count, context_ids in plan_slots(event):
        slots = open_slots(event, deps, start, count)
        round_.out.already += count - len(slots)
        context = _context(history, mode, context_ids, started.config.context_size)
        parents = [r.idea_id for r in context] if mode == "exploit" else []
        filled = 0
        max_calls = (
            math.ceil(len(slots) / settings.ideas_per_call) + deps.extra_calls if slots else 0
        )
        for _ in range(max_calls):
            wanted = len(slots) - filled
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
                structured=deps.structured,
            )
            try:
                _check_budget(deps, started, round_)
            except DollarBudgetSpent as exc:  # keep what this generation has; the evolver ends it
                round_.out.budget_stop = str(exc)
                log.warning("%s: %s", describe(event), exc)
                break
            for idea, digest, usage in round_.ask(
                prompt, wanted, settings.thinking_budget, deps.structured
            ):
                round_.out.events.append(
                    idea_event(
                        event,
                        deps,
                        slots[filled],
                        mode,
                        parent_ids=parents,
                        title=idea.title,
                        text=idea.text,
                        proposer=ProposerInfo(kind="llm", model=client.spec.label),
                        prompt_digest=digest,
                        usage=usage,
                    )
                )
                filled += 1
            stream(round_.out, deps)  # the implementer starts on these while we write more
        round_.out.unfilled += len(slots) - filled
    out, unspent = round_.out, round_.unspent
    if unspent.calls and out.events:  # calls that yielded nothing still cost money: keep the total
        last = out.events[-1]  # never streamed (generation.stream): it can still change
        out.events[-1] = last.model_copy(update={"usage": add_usage(last.usage, unspent)})
    elif unspent.calls:
        log.warning(
            "%s: %d model calls ($%.4f) produced no usable idea",
            describe(event),
            unspent.calls,
            unspent.cost_usd,
        )
    return out
