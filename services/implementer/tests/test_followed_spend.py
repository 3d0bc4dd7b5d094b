"""What the implementer reads of a search's log for each idea, from its follower of the log:
the SearchStarted, and with a dollar budget the spend and the mean cost of an implementer
call, exactly as a replay of the whole log gives them."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.implementer.service import ImplementerContext
from groundloop.llm.pricing import spent_usd
from groundloop.settings import Settings
from tests import factories as f

E = TypeVar("E", bound=ev.Event)


def costing(event: E, calls: int, usd: float) -> E:
    return event.model_copy(update={"usage": ev.Usage(calls=calls, cost_usd=usd)})


async def replayed_spend(bus: Bus, search_id: str) -> tuple[float, float]:
    """The spend as the implementer read it before it followed the log: a whole replay."""
    logged = [e async for e in bus.events(search_id)]
    patches = [e.usage for e in logged if isinstance(e, ev.PatchReady | ev.PatchFailed)]
    calls = sum(u.calls for u in patches)
    return spent_usd(logged), (sum(u.cost_usd for u in patches) / calls if calls else 0.0)


async def test_spend_and_search_are_those_of_the_whole_log(settings: Settings, tmp_path: Path):
    bus = await Bus.connect(settings, "t")
    started = f.search_started("isp", budgets=ev.Budgets(dollars=5.0))
    free = f.search_started("ifree")
    g0 = f.generation_advanced(started, 0, ev.GenerationPlan(fresh=3))
    ideas = [costing(f.idea(g0, slot), 1, 0.0131 * (slot + 1)) for slot in range(3)]
    first = [started, free, g0, *ideas, costing(f.patch_ready(ideas[0]), 3, 0.0217)]
    seqs = [(await bus.publish(e)).seq for e in first]
    garbage = f"{settings.subject_prefix}.isp.PatchReady.cpu"
    await bus.js.publish(garbage, b'{"type": "PatchReady"}', headers={"Nats-Msg-Id": "junk"})
    ctx = ImplementerContext(settings, bus, None, tmp_path)

    assert await ctx.find_search("isp", seqs[4]) == started
    assert await ctx.spend("isp", started) == await replayed_spend(bus, "isp")
    failed = ideas[1].derive(
        ev.PatchFailed,
        "implementer",
        idea_id=ideas[1].idea_id,
        generation=0,
        attempts=2,
        stage="apply",
        last_error="does not apply",
    )
    for event in (costing(failed, 2, 0.0093), costing(f.patch_ready(ideas[2]), 1, 0.0301)):
        await bus.publish(event)
    spend = await ctx.spend("isp", started)
    assert spend == await replayed_spend(bus, "isp") and spend[0] > 0 and spend[1] > 0
    assert await ctx.spend("ifree", free) == (0.0, 0.0)  # no budget: nothing read
    await bus.close()
