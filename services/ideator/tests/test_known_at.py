"""What a generation's ideas are written from: the log before its GenerationAdvanced, plus
the generation's ideas already published. Results that arrive later do not change what a
redelivery (or a replica taking over) writes for the remaining slots."""

from __future__ import annotations

import copy

from groundloop import events as ev
from groundloop.ideator.history import SearchHistory
from groundloop.ideator.service import FittingLog, known_at
from groundloop.llm.pricing import spent_usd
from tests import factories as f


def test_a_redelivery_sees_the_log_as_the_first_delivery_did():
    started = f.search_started("k1")
    g0 = f.generation_advanced(started, 0, ev.GenerationPlan(fresh=2))
    old = [f.idea(g0, slot) for slot in range(2)]
    old_result = failed(old[0])
    g1 = f.generation_advanced(started, 1, ev.GenerationPlan(explore=3))
    written = f.idea(g1, 0, generation=1)  # published before the first delivery died
    late = failed(old[1])  # a result that arrived after g1 opened
    pairs = list(enumerate([started, g0, *old, old_result, g1, written, late], start=1))
    g1_seq = next(seq for seq, e in pairs if e is g1)

    seen = known_at(g1, g1_seq, pairs)
    assert written in seen and old_result in seen
    assert late not in seen and g1 not in seen
    assert known_at(g1, 0, pairs) == [e for _, e in pairs]  # a direct call: the whole log


def failed(idea: ev.IdeaProposed) -> ev.PatchFailed:
    return idea.derive(
        ev.PatchFailed,
        "implementer",
        generation=idea.generation,
        idea_id=idea.idea_id,
        attempts=1,
        stage="apply",
        last_error="does not apply",
    )


def test_the_kept_history_is_the_history_of_known_at_generation_after_generation():
    """`FittingLog.history_at` folds each entry once across generations, yet hands every
    generation (and a redelivery of an earlier one) the history of `known_at`; a history
    handed out does not change as the log goes on, and the sums are the whole log's."""
    started = f.search_started("k2")
    log: list[ev.Event] = [started]
    openings: list[tuple[ev.GenerationAdvanced, list[ev.IdeaProposed]]] = []
    for generation in range(4):
        opened = f.generation_advanced(started, generation, ev.GenerationPlan(fresh=3))
        ideas = [spending(f.idea(opened, slot, generation=generation), slot) for slot in range(3)]
        log += [opened, *ideas[:2]]  # the third idea comes after later results
        if openings:  # results of the ideas of the generation before, after this one opened
            before, first_patch = openings[-1][1], f.patch_ready(openings[-1][1][0])
            late = f.run_completed(first_patch, 9.0).model_copy(
                update={"event_id": f"late{generation}"}
            )
            log += [failed(before[2]), late]
        patches = [f.patch_ready(idea) for idea in ideas[:2]]
        log += [*patches, f.run_completed(patches[0], 0.5 + generation), failed(ideas[1])]
        log += [ideas[2], f.run_completed(patches[1], 0.1)]
        openings.append((opened, ideas))
    log.append(stopped := started.derive(ev.SearchStopped, "cli", stage="user", reason="enough"))
    forged = failed(f.idea(openings[0][0], 9))  # for an idea never proposed: does not fit

    fold = FittingLog("k2")
    entries = list(enumerate([*log[:5], forged, *log[5:]], start=1))
    handed: list[tuple[SearchHistory, SearchHistory]] = []

    def hand(opened: ev.GenerationAdvanced, seq: int) -> None:
        got = fold.history_at(opened, seq)
        want = SearchHistory.from_events("k2", known_at(opened, seq, fold.pairs))
        assert got == want and got.ideas and got is not fold.history_at(opened, seq)
        handed.append((got, copy.deepcopy(got)))

    for seq, entry in entries:
        fold.add(seq, entry)
        if isinstance(entry, ev.GenerationAdvanced) and entry.generation:  # its delivery
            hand(entry, seq)
    for index in (3, 0, 2, 1, 3):  # redeliveries, in any order
        opened = openings[index][0]
        hand(opened, next(seq for seq, e in entries if e is opened))
    pairs = fold.pairs
    assert forged not in [e for _, e in pairs]
    assert fold.history_at(opened, 0) == SearchHistory.from_events("k2", [e for _, e in pairs])
    for got, as_handed in handed:  # later folds changed none of the histories handed out
        assert got == as_handed
    everything = [e for _, e in pairs]
    assert fold.ended is stopped
    assert fold.spent_usd == spent_usd(everything) > 0
    ideas = [e for e in everything if isinstance(e, ev.IdeaProposed)]
    assert fold.ideator_calls == sum(e.usage.calls for e in ideas) == 16
    assert fold.ideator_usd == sum(e.usage.cost_usd for e in ideas)


def spending(idea: ev.IdeaProposed, calls: int) -> ev.IdeaProposed:
    usage = ev.Usage(calls=calls % 2 + 1, cost_usd=0.01 * (calls + 1))
    return idea.model_copy(update={"usage": usage})
