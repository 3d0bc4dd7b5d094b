"""What proposing one generation's ideas takes and yields, shared by the ideator's proposers
(knobs in `service`, language models in `llm_proposer`): `IdeatorDeps`, `Generated`, the
plan's slots in order, the slots still open (no idea in the log yet), the IdeaProposed for
one slot (stable idea and event ids), and `stream`, which hands ideas to `IdeatorDeps.emit`
as soon as they are written, so the implementer and the runners start on a generation's
first ideas while the rest are still being written.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from groundloop.events import GenerationAdvanced, IdeaProposed, ModelPrice, stable_id
from groundloop.execution.environment import Environment
from groundloop.ideator.history import SearchHistory
from groundloop.llm.client import LLMClient
from groundloop.llm.duplicates import DuplicateFilter

PRODUCER = "ideator"


@dataclass
class IdeatorDeps:
    history: SearchHistory
    environment: Callable[[str], Environment]  # name -> Environment
    llm: Callable[[str, dict[str, ModelPrice] | None], LLMClient]  # model spec, prices -> client
    producer: str = PRODUCER
    duplicate_threshold: float = 0.9  # dropping a distinct idea costs more than keeping a near one
    extra_calls: int = 2  # calls beyond ceil(count / ideas_per_call) to make up for drops
    structured: bool = True  # ask for JSON (response_format); parsing accepts any shape anyway
    # The search's model spend so far (from its log) and the ideator's share of it, so each
    # call can be refused before it would take the search past its dollar budget.
    spent_usd: float = 0.0
    ideator_calls: int = 0
    ideator_usd: float = 0.0
    # Publishes one idea now (the service: through the bus, from the handler's thread); None:
    # every idea is returned by the handler at the end, as tests that need no broker expect.
    emit: Callable[[IdeaProposed], None] | None = None
    # The process's duplicate filters of earlier generations (None: built from every idea).
    seen_ideas: SeenIdeas | None = None


class SeenIdeas:
    """Per search, the duplicate filter of the ideas written so far, carried from one
    generation to the next: rebuilt from every idea each generation, it cost ~0.2 s at 1,000
    ideas (quadratic over a search). Used only when the ideas it saw are the first of the
    ones asked for, in order; otherwise built afresh. Thread-safe (handlers run in threads);
    each caller gets its own copy to admit into."""

    def __init__(self, searches: int = 16) -> None:
        self._searches = searches
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, tuple[list[str], DuplicateFilter]] = OrderedDict()

    def filter(self, search_id: str, texts: list[str], threshold: float) -> DuplicateFilter:
        with self._lock:
            kept = self._kept.get(search_id)
        if kept is not None and kept[1].threshold == threshold and texts[: len(kept[0])] == kept[0]:
            made, rest = kept[1].copy(), texts[len(kept[0]) :]
        else:
            made, rest = DuplicateFilter(threshold=threshold), texts
        for text in rest:
            made.add(text)
        with self._lock:
            self._kept[search_id] = (list(texts), made.copy())
            self._kept.move_to_end(search_id)
            while len(self._kept) > self._searches:
                self._kept.popitem(last=False)
        return made


@dataclass
class Generated:
    events: list[IdeaProposed] = field(default_factory=list)
    dropped: int = 0  # duplicates (and knob slots with no untried setting)
    calls: int = 0
    unfilled: int = 0  # planned slots left without an idea
    rejected: int = 0  # idea-shaped texts that echoed the prompt's template
    empty_calls: int = 0  # calls that gave no parsable idea
    budget_stop: str | None = None  # why calls stopped early: the dollar budget was reached
    already: int = 0  # planned slots whose idea an earlier delivery already published
    emitted: int = 0  # the first `emitted` events went out through IdeatorDeps.emit

    def pending(self) -> list[IdeaProposed]:
        """The events not yet published: the handler returns these."""
        return self.events[self.emitted :]


def stream(out: Generated, deps: IdeatorDeps) -> None:
    """Publish the ideas written so far but the last: its usage may still grow (calls that
    yield nothing are charged to the generation's last idea), so it goes out with the
    handler's return. A redelivery publishes the same event ids and skips slots already in
    the log (`open_slots`), so publishing early changes no outcome."""
    if deps.emit is None:
        return
    while out.emitted < len(out.events) - 1:
        deps.emit(out.events[out.emitted])
        out.emitted += 1


def open_slots(event: GenerationAdvanced, deps: IdeatorDeps, start: int, count: int) -> list[int]:
    """The slots in [start, start + count) with no idea in the log yet (a delivery before this
    one may have published some before it failed)."""
    return [
        slot
        for slot in range(start, start + count)
        if stable_id(event.search_id, event.generation, slot) not in deps.history.ideas
    ]


def plan_slots(event: GenerationAdvanced) -> list[tuple[str, int, int, list[str]]]:
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


def idea_event(
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
