"""The ideator's view of a search's log, kept by its follower of the log: the events that fit
the log with their stream sequences, so what a generation's ideas are written from
(`known_at`) is what a reading of the whole log gives, forged entries and all."""

from __future__ import annotations

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.ideator.service import IdeatorContext, known_at
from groundloop.llm.client import ClientCache, LLMSettings
from groundloop.search_index import fitting_events
from groundloop.settings import Settings
from tests import factories as f

SEARCH = "ifl"


def failed(idea: ev.IdeaProposed, index: int = 0) -> ev.PatchFailed:
    return idea.derive(
        ev.PatchFailed,
        "implementer",
        index,
        generation=idea.generation,
        idea_id=idea.idea_id,
        attempts=1,
        stage="apply",
        last_error="does not apply",
    )


async def test_the_followed_log_is_what_fits_the_whole_log(settings: Settings):
    bus = await Bus.connect(settings, "t")
    started = f.search_started(SEARCH)
    g0 = f.generation_advanced(started, 0, ev.GenerationPlan(fresh=2))
    old = [f.idea(g0, slot) for slot in range(2)]
    stray = failed(f.idea(g0, 7), 1)  # for an idea never proposed: does not fit
    g1 = f.generation_advanced(started, 1, ev.GenerationPlan(explore=3))
    written = f.idea(g1, 0, generation=1)
    late = failed(old[1], 2)
    before = [started, g0, *old, stray, failed(old[0]), g1]
    seqs = [(await bus.publish(e)).seq for e in before]
    ctx = IdeatorContext(bus, settings, ClientCache(LLMSettings()))
    first = list((await ctx.logs.to_end(SEARCH)).pairs)
    for event in (written, late):
        await bus.publish(event)
    pairs = list((await ctx.logs.to_end(SEARCH)).pairs)

    raw = [pair async for pair in bus.raw_events(SEARCH)]
    fits = fitting_events([e for _, e in raw])
    assert pairs == [(seq, e) for seq, e in raw if e in fits] and stray not in fits
    assert pairs[: len(first)] == first
    g1_seq = seqs[-1]
    assert known_at(g1, g1_seq, pairs) == known_at(g1, g1_seq, raw)
    assert written in known_at(g1, g1_seq, pairs) and late not in known_at(g1, g1_seq, pairs)
    await bus.close()
