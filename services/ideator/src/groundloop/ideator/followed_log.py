"""A search's log as the ideator follows it: the events that fit it, with their stream
sequences, and what a generation's ideas are written from (`known_at`, and the history folded
from it, `FittingLog.history_at`).

The process's follower of the search folds each entry once into a `FittingLog`. The history a
generation is written from is kept folded too: each generation folds only the entries since
the one before, instead of the whole log (~6,000 events per generation at 1,000 candidates,
folded on the event loop: 4 % of the embedded search's time), and copies the ideas' records
(still one copy per idea per generation, but a copy, not a fold of every event).
"""

from __future__ import annotations

from bisect import bisect_left

from groundloop.events import (
    Event,
    GenerationAdvanced,
    IdeaProposed,
    SearchCompleted,
    SearchStopped,
)
from groundloop.ideator.history import SearchHistory
from groundloop.llm.pricing import spent_usd
from groundloop.search_index import SearchFold, fitting_events


def known_at(event: GenerationAdvanced, seq: int, pairs: list[tuple[int, Event]]) -> list[Event]:
    """What the generation's ideas are written from: the log before the GenerationAdvanced
    (at stream sequence `seq`), plus this generation's ideas an earlier delivery already
    published. Results that arrived since change nothing, so a redelivery, or a replica that
    takes over mid-generation, writes the remaining slots as the first delivery would have."""
    if seq <= 0:  # not from a delivery (a direct call): the whole log
        return fitting_events([e for _, e in pairs])
    return fitting_events(
        [
            e
            for at, e in pairs
            if at < seq or (isinstance(e, IdeaProposed) and e.generation == event.generation)
        ]
    )


class FittingLog(SearchFold):
    """A search's events that fit its log (`fitting_events`), with their stream sequences,
    in log order, and the sums the ideator reads off the whole log (its end, the dollars
    spent, the ideator's calls): kept current by the process's follower of the search."""

    def __init__(self, search_id: str):
        super().__init__(search_id)
        self.pairs: list[tuple[int, Event]] = []
        self.ended: SearchCompleted | SearchStopped | None = None  # the first of either
        self.spent_usd = 0.0  # every model call's cost, as `pricing.spent_usd` sums the log
        self.ideator_calls = 0
        self.ideator_usd = 0.0
        # The history of the log's first `_prefix_len` entries, for the next generation.
        self._prefix = SearchHistory(search_id)
        self._prefix_len = 0

    def fit(self, seq: int, event: Event) -> None:
        self.pairs.append((seq, event))
        if self.ended is None and isinstance(event, SearchCompleted | SearchStopped):
            self.ended = event
        self.spent_usd += spent_usd((event,))
        if isinstance(event, IdeaProposed):
            self.ideator_calls += event.usage.calls
            self.ideator_usd += event.usage.cost_usd

    def history_at(self, event: GenerationAdvanced, seq: int) -> SearchHistory:
        """The history folded from `known_at(event, seq, pairs)`: a copy the handler may
        read in its thread while the follower goes on folding this one."""
        if seq <= 0:
            return SearchHistory.from_events(self.search_id, (e for _, e in self.pairs))
        before = bisect_left(self.pairs, seq, key=lambda pair: pair[0])  # entries before seq
        if before < self._prefix_len:  # an earlier generation, redelivered: fold it afresh
            history = SearchHistory.from_events(self.search_id, (e for _, e in self.pairs[:before]))
        else:
            for _, entry in self.pairs[self._prefix_len : before]:
                self._prefix.apply(entry)
            self._prefix_len = before
            history = self._prefix.copy()
        for _, entry in self.pairs[before:]:
            if isinstance(entry, IdeaProposed) and entry.generation == event.generation:
                history.apply(entry)
        return history
