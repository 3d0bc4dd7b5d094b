"""Ideas go out as they are written (IdeatorDeps.emit), all but the last, which the handler
returns; a redelivery writes only the slots with no idea in the log, under the same ids."""

from __future__ import annotations

from groundloop import events as ev
from groundloop.execution.environment import Environment
from groundloop.ideator.history import SearchHistory
from groundloop.ideator.service import IdeatorDeps, handle
from groundloop.llm.client import ClientCache, LLMSettings
from tests.factories import search_started_in


def deps_for(env: Environment, logged: list[ev.Event], emitted: list[ev.Event]) -> IdeatorDeps:
    return IdeatorDeps(
        history=SearchHistory.from_events("s1", logged),
        environment=lambda _n: env,
        llm=ClientCache(LLMSettings()),
        emit=emitted.append,
    )


def test_ideas_stream_out_and_a_redelivery_fills_only_the_open_slots():
    env = Environment.load("synthetic")
    started = search_started_in(env, "s1", 1, generations=2, ideas_per_generation=5)
    gen0 = ev.GenerationAdvanced(
        search_id="s1", producer="evolver", generation=0, plan=ev.GenerationPlan(fresh=5)
    )
    emitted: list[ev.Event] = []
    returned = handle(gen0, deps_for(env, [started], emitted))
    assert len(emitted) == 4 and len(returned) == 1  # the last idea goes with the return
    every = emitted + returned
    assert [e.idea_id for e in every] == [ev.stable_id("s1", 0, slot) for slot in range(5)]

    # The first delivery died after publishing two ideas: the next writes slots 2..4 only.
    again: list[ev.Event] = []
    rest = handle(gen0, deps_for(env, [started, *every[:2]], again))
    written = again + rest
    assert [e.idea_id for e in written] == [e.idea_id for e in every[2:]]
    assert [e.event_id for e in written] == [e.event_id for e in every[2:]]
    assert not any(isinstance(e, ev.IdeasShortfall) for e in written)
