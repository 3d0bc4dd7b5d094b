"""What a generation's ideas are written from: the log before its GenerationAdvanced, plus
the generation's ideas already published. Results that arrive later do not change what a
redelivery (or a replica taking over) writes for the remaining slots."""

from __future__ import annotations

from groundloop import events as ev
from groundloop.ideator.service import known_at
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
