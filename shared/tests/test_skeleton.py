"""The service skeleton (`groundloop.skeleton.run_role`) on a real nats-server: a role's deps
live exactly as long as the role, and a Retry that nothing will ever redeliver is
dead-lettered with its real reason."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.consumer import Delivery, Retry
from groundloop.settings import Settings
from groundloop.skeleton import Role, run_role
from tests.factories import search_started
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)


class Deps:
    """What a role's deps context did, and the bus it was given."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.bus: Bus | None = None
        self.handled: list[tuple[str, int]] = []
        self.exhausted: list[str] = []


def role_with(deps: Deps, handle, on_exhausted=None, name: str = "skeleton-test") -> Role[Deps]:
    @contextlib.asynccontextmanager
    async def context(settings: Settings, bus: Bus, stop: asyncio.Event) -> AsyncIterator[Deps]:
        deps.log.append("open")
        deps.bus = bus
        try:
            yield deps
        finally:
            deps.log.append(f"close (bus closed: {bus.nc.is_closed})")

    return Role(
        name=name,
        consumes=(ev.SearchStarted,),
        deps=context,
        handle=handle,
        on_exhausted=on_exhausted,
    )


async def _publish(settings: Settings, *events: ev.Event) -> Bus:
    bus = await Bus.connect(settings, "test")
    for event in events:
        await bus.publish(event)
    return bus


async def test_deps_are_open_while_handling_and_closed_before_the_bus_at_exit(
    settings: Settings,
):
    deps = Deps()

    async def handle(event: ev.Event, delivery: Delivery, d: Deps) -> list[ev.Event]:
        d.handled.append((f"{event.search_id} with deps {d.log}", delivery.attempt))
        return []

    bus = await _publish(settings, search_started("a"), search_started("b"))
    stop = asyncio.Event()
    task = asyncio.create_task(run_role(role_with(deps, handle), settings, stop))
    await eventually(lambda: len(deps.handled) == 2, timeout=20, what="both events handled")
    assert deps.log == ["open"]
    stop.set()
    await asyncio.wait_for(task, 20)
    assert sorted(deps.handled) == [("a with deps ['open']", 1), ("b with deps ['open']", 1)]
    assert deps.log == ["open", "close (bus closed: False)"]  # deps first, then the bus
    assert deps.bus is not None and deps.bus.nc.is_closed
    await bus.close()


async def test_deps_are_closed_when_the_role_fails(settings: Settings):
    deps = Deps()

    async def handle(event: ev.Event, delivery: Delivery, d: Deps) -> list[ev.Event]:
        return []

    # A durable consumer name the NATS client refuses: consuming fails after deps are open.
    role = role_with(deps, handle, name="bad.name")
    with pytest.raises(ValueError, match="invalid consumer name"):
        await asyncio.wait_for(run_role(role, settings, asyncio.Event()), 20)
    assert deps.log == ["open", "close (bus closed: False)"]
    assert deps.bus is not None and deps.bus.nc.is_closed


async def test_retry_on_the_last_delivery_is_dead_lettered_with_its_reason(settings: Settings):
    settings = settings.model_copy(update={"max_deliver": 2})
    deps = Deps()

    async def handle(event: ev.Event, delivery: Delivery, d: Deps) -> list[ev.Event]:
        d.handled.append((event.search_id, delivery.attempt))
        raise Retry("no environment 'synthetic' on this replica", delay=0.05)

    bus = await _publish(settings, search_started("retry"))
    stop = asyncio.Event()
    task = asyncio.create_task(run_role(role_with(deps, handle), settings, stop))
    letters = await eventually(
        lambda: bus.dead_letters("skeleton-test"), timeout=20, what="a dead letter"
    )
    stop.set()
    await asyncio.wait_for(task, 20)
    [(headers, body)] = letters
    assert headers["Groundloop-Reason"] == (
        "no environment 'synthetic' on this replica (still so on the last delivery)"
    )
    assert ev.decode(body).search_id == "retry"
    assert deps.handled == [("retry", 1), ("retry", 2)]
    await bus.close()


async def test_with_on_exhausted_a_last_retry_is_left_to_the_exhaustion_handler(
    settings: Settings,
):
    settings = settings.model_copy(update={"max_deliver": 2})
    deps = Deps()

    async def handle(event: ev.Event, delivery: Delivery, d: Deps) -> list[ev.Event]:
        d.handled.append((event.search_id, delivery.attempt))
        raise Retry("runner busy", delay=0.05)

    async def on_exhausted(event: ev.Event, reason: str) -> list[ev.Event]:
        deps.exhausted.append(reason)
        return []

    bus = await _publish(settings, search_started("exhaust"))
    stop = asyncio.Event()
    role = role_with(deps, handle, on_exhausted=on_exhausted)
    task = asyncio.create_task(run_role(role, settings, stop))
    letters = await eventually(
        lambda: bus.dead_letters("skeleton-test"), timeout=20, what="a dead letter"
    )
    stop.set()
    await asyncio.wait_for(task, 20)
    reason = "no skeleton-test finished it in 2 deliveries"
    assert deps.exhausted == [reason]
    assert [h["Groundloop-Reason"] for h, _ in letters] == [reason]
    assert deps.handled == [("exhaust", 1), ("exhaust", 2)]
    await bus.close()


async def test_a_released_delivery_lets_the_consumer_fetch_the_next_before_it_ends(
    settings: Settings,
):
    """Concurrency 1: the second event reaches the handler while the first is still in it
    only once the first has called `Delivery.release()` (a runner whose slot is free again)."""
    deps = Deps()
    finish: dict[str, asyncio.Event] = {"a": asyncio.Event(), "b": asyncio.Event()}
    release_a = asyncio.Event()

    async def handle(event: ev.Event, delivery: Delivery, d: Deps) -> list[ev.Event]:
        d.handled.append((event.search_id, delivery.attempt))
        if event.search_id == "a":
            await release_a.wait()
            delivery.release()
            delivery.release()  # a second call gives nothing more back
        await finish[event.search_id].wait()
        return []

    bus = await _publish(settings, search_started("a"), search_started("b"))
    stop = asyncio.Event()
    task = asyncio.create_task(run_role(role_with(deps, handle), settings, stop))
    await eventually(lambda: deps.handled, timeout=20, what="the first event handled")
    await asyncio.sleep(1.5)  # more than one fetch timeout: nothing else may be fetched
    assert deps.handled == [("a", 1)]
    release_a.set()
    await eventually(lambda: len(deps.handled) == 2, timeout=20, what="the second event")
    assert deps.handled == [("a", 1), ("b", 1)]  # while "a" is still being handled
    finish["b"].set()
    finish["a"].set()
    stop.set()
    await asyncio.wait_for(task, 20)
    await bus.close()
