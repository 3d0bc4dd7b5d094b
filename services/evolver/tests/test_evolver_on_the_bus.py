"""`run()` wiring on a real nats-server: two evolver replicas, then a restart."""

from __future__ import annotations

import pytest

from groundloop.events import (
    Event,
    GenerationAdvanced,
    RunRequested,
    SearchCompleted,
)
from groundloop.evolver.service import Deps
from groundloop.evolver.state import SearchState
from tests.evolver_world import (
    SEARCH,
    World,
    manifest,
    search_started,
)

# ---------------------------------------------------------------------------- on the bus


@pytest.mark.parametrize("consumer_lost", [False, True])
async def test_two_replicas_and_a_restart_on_a_real_broker(settings, consumer_lost) -> None:
    """run() wiring: two evolver replicas share the durable consumer (each folds what the
    other consumed), are stopped after generation 1 opens, and a fresh one rebuilds from the
    log and finishes; every generation is advanced exactly once. With `consumer_lost` the
    durable consumer is deleted before the restart, so every event so far is delivered again
    as new (as if every ack had been lost): the evolver keeps no processed-events marks, and
    handling an event it already folded and decided on must change nothing."""
    import asyncio

    from groundloop.bus import Bus
    from groundloop.consumer import consume
    from groundloop.evolver.service import EvolverLoop, run

    bus = await Bus.connect(settings, name="test")
    world = World()  # only its reactions: the ideator, implementer and runners
    stop_world, stop_first, stop_second = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen: dict[str, asyncio.Event] = {
        "GenerationAdvanced.1": asyncio.Event(),
        "SearchCompleted": asyncio.Event(),
    }

    async def watch(msg) -> None:
        kind = ".".join(msg.subject.split(".")[2:4])
        for key, flag in seen.items():
            if kind.startswith(key):
                flag.set()

    await bus.nc.subscribe(f"{settings.subject_prefix}.{SEARCH}.>", cb=watch)

    async def react(event: Event, delivery) -> list[Event]:
        return world.react(event)

    def replica() -> Deps:
        return Deps(environments=lambda name: manifest())

    tasks = [
        asyncio.create_task(consume(bus, "world", [bus.subject_filter()], react, stop=stop_world))
    ]
    tasks += [
        asyncio.create_task(run(settings, stop_first, tick_s=0.2, deps=replica())) for _ in range(2)
    ]
    try:
        await bus.publish(search_started(generations=3, ideas_per_generation=3, final_seeds=2))
        await asyncio.wait_for(seen["GenerationAdvanced.1"].wait(), 60)
        stop_first.set()
        await asyncio.wait_for(asyncio.gather(*tasks[1:]), 30)
        if consumer_lost:
            await bus.js.delete_consumer(settings.stream, "evolver")
        restarted = replica()
        tasks.append(asyncio.create_task(run(settings, stop_second, tick_s=0.2, deps=restarted)))
        await asyncio.wait_for(seen["SearchCompleted"].wait(), 60)
    finally:
        for flag in (stop_world, stop_first, stop_second):
            flag.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    log = [event async for event in bus.events(SEARCH)]
    assert [e.generation for e in log if isinstance(e, GenerationAdvanced)] == [0, 1, 2]
    requested = [e.run_id for e in log if isinstance(e, RunRequested)]
    assert (
        len(requested) == len(set(requested)) == 2 + 2 * 2
    )  # baseline (7, 8) + top 2 × seeds 7, 8
    (done,) = [e for e in log if isinstance(e, SearchCompleted)]
    assert len(done.final) == 2 and all(len(f.scores) == 2 for f in done.final)
    assert await bus.dead_letters("evolver") == []
    # The restarted replica folded the log to its end: the search ended, so its state is gone.
    assert SearchState.fold(log).ended and SEARCH in restarted.ended
    assert SEARCH not in restarted.states
    rebuilt = Deps(environments=lambda name: manifest())
    await EvolverLoop(bus, rebuilt).rebuild()  # a later start-up decides nothing new
    assert [e.event_id async for e in bus.events(SEARCH)] == [e.event_id for e in log]
    await bus.close()
