"""The trainer's state of a search, folded by its follower of the log as the log is written:
the fold of the events that fit the whole log (a forged result rewards nothing), and the copy
a handler advances leaves the followed fold as the log has it."""

from __future__ import annotations

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.rl_trainer.service import TrainerContext
from groundloop.rl_trainer.state import RLState
from groundloop.search_index import fitting_events
from groundloop.settings import Settings
from tests import factories as f

SEARCH = "rlf"


async def whole_log(bus: Bus) -> RLState:
    """The state as the trainer folded it before it followed the log: a whole replay."""
    return RLState.fold(SEARCH, fitting_events([e async for e in bus.events(SEARCH)]))


async def test_the_followed_state_is_the_fold_of_what_fits_the_whole_log(settings: Settings):
    bus = await Bus.connect(settings, "t")
    started = f.search_started(SEARCH, strategy="rl", rl=ev.RLSettings())
    g0 = f.generation_advanced(started, 0, ev.GenerationPlan(rl=2))
    ideas = [f.policy_idea(g0, slot) for slot in range(2)]
    patches = [f.patch_ready(idea) for idea in ideas]
    forged = f.run_of_idea(ideas[1], "succeeded", 9.0)  # a run nobody asked for
    for event in [started, g0, *ideas, patches[0], forged, f.run_completed(patches[0], 0.7)]:
        await bus.publish(event)
    ctx = TrainerContext(bus, settings)

    state = await ctx.read_state(SEARCH)
    assert state == await whole_log(bus)
    assert state.rewards == {ideas[0].idea_id: 0.7} and state.due_update() is None
    state.apply(f.run_completed(patches[1], 0.4))  # a handler advancing its copy
    assert state.due_update() is not None
    assert await ctx.read_state(SEARCH) == await whole_log(bus)  # the followed fold is not

    g1 = f.generation_advanced(started, 1, ev.GenerationPlan(rl=2))
    for event in [patches[1], f.run_completed(patches[1], 0.4), g1]:
        await bus.publish(event)
    state = await ctx.read_state(SEARCH)
    assert state == await whole_log(bus)
    group = state.due_update()
    assert group is not None and group.reward_list(SEARCH) == [0.7, 0.4]
    await bus.close()
