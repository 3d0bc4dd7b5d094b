"""The ideas a handler writes in its thread reach the log in the order written, without the
handler waiting for each publish; after one that fails, none goes out and the handler hears."""

from __future__ import annotations

import threading

import pytest

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.ideator.emitter import EmitFailed, OrderedEmitter
from groundloop.settings import Settings
from tests import factories as f

SEARCH = "emits"


def ideas(count: int, huge: int | None = None) -> list[ev.IdeaProposed]:
    opened = f.generation_advanced(f.search_started(SEARCH), 0, ev.GenerationPlan(fresh=count))
    made = [f.idea(opened, slot) for slot in range(count)]
    if huge is not None:  # over the broker's payload limit (8 MiB): its publish fails
        made[huge] = made[huge].model_copy(update={"text": "x" * 9_000_000})
    return made


def write_blocking_the_loop(emitter: OrderedEmitter, written: list[ev.IdeaProposed]) -> list:
    """Submit from another thread while the event loop is held here: a submit that waited
    for its publish would never return."""
    refused: list[Exception] = []
    done = threading.Event()

    def write() -> None:
        for idea in written:
            try:
                emitter.submit(idea)
            except EmitFailed as exc:
                refused.append(exc)
        done.set()

    threading.Thread(target=write).start()
    assert done.wait(timeout=30), "submit waited for the event loop"
    return refused


async def test_ideas_go_out_in_the_order_written_and_submit_does_not_wait(settings: Settings):
    bus = await Bus.connect(settings, "t")
    emitter = OrderedEmitter(bus)
    written = ideas(40)
    assert write_blocking_the_loop(emitter, written) == []
    await emitter.drain()
    logged = [e async for _, e in bus.raw_events(SEARCH)]
    assert [e.event_id for e in logged] == [i.event_id for i in written]
    await bus.close()


async def test_after_a_failed_publish_no_idea_goes_out_and_the_handler_hears(settings: Settings):
    bus = await Bus.connect(settings, "t")
    emitter = OrderedEmitter(bus)
    written = ideas(6, huge=2)
    assert write_blocking_the_loop(emitter, written) == []  # nothing published yet
    with pytest.raises(EmitFailed, match="publishing an idea failed"):
        await emitter.drain()
    logged = [e async for _, e in bus.raw_events(SEARCH)]
    assert [e.event_id for e in logged] == [i.event_id for i in written[:2]]
    with pytest.raises(EmitFailed):  # a handler still writing hears it at its next idea
        emitter.submit(written[3])
    await bus.close()
