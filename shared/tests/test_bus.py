"""The bus and the consumer loop against a real nats-server (one per module, random port)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from groundloop import events as ev
from groundloop import telemetry
from groundloop.broker import NatsServer, free_port
from groundloop.bus import BrokerUnavailable, Bus
from groundloop.consumer import Delivery, Reject, consume
from groundloop.settings import Settings
from tests.factories import idea, one_search, search_started
from tests.waiting import eventually


class Recorder:
    """A handler that records what it saw and emits nothing."""

    def __init__(self):
        self.seen: list[ev.Event] = []

    async def __call__(self, event: ev.Event, delivery: Delivery) -> list[ev.Event]:
        self.seen.append(event)
        return []


async def test_publishing_the_same_event_twice_stores_it_once(settings: Settings):
    bus = await Bus.connect(settings, "t")
    start = search_started("dup")
    first, second = await bus.publish(start), await bus.publish(start)
    assert not first.duplicate and second.duplicate and second.seq == first.seq
    assert [e async for e in bus.events("dup")] == [start]
    await bus.close()


async def test_ensure_is_idempotent_across_connections(settings: Settings):
    a = await Bus.connect(settings, "a")
    b = await Bus.connect(settings, "b")
    await a.publish(search_started("idem"))
    await b.ensure()
    assert (await b.stream_state())["messages"] == 1
    await a.close(), await b.close()


async def test_replay_returns_one_search_in_publish_order(settings: Settings):
    bus = await Bus.connect(settings, "t")
    mine, other = one_search("mine", ideas=4), one_search("other", ideas=2)
    for a, b in zip(mine, other + [None] * len(mine), strict=False):
        await bus.publish(a)
        if b is not None:
            await bus.publish(b)
    assert [e async for e in bus.events("mine")] == mine
    assert len([e async for e in bus.events()]) == len(mine) + len(other)
    await bus.close()


async def test_unacked_message_is_redelivered_to_another_replica(settings: Settings):
    bus = await Bus.connect(settings, "t")
    stop = asyncio.Event()
    crashed = asyncio.Event()

    async def dies_without_ack(event: ev.Event, delivery: Delivery) -> list[ev.Event]:
        crashed.set()
        await asyncio.Event().wait()  # hangs forever: a replica that died mid-handler
        return []

    survivor = Recorder()
    first = asyncio.create_task(
        consume(bus, "role", [bus.subject_filter()], dies_without_ack, stop=stop)
    )
    await bus.publish(search_started("redeliver"))
    await asyncio.wait_for(crashed.wait(), 10)
    first.cancel()  # the replica is gone; its message was never acked
    second = asyncio.create_task(consume(bus, "role", [bus.subject_filter()], survivor, stop=stop))
    await eventually(lambda: survivor.seen, timeout=settings.ack_wait_s + 10, what="redelivery")
    assert survivor.seen[0].search_id == "redeliver"
    stop.set()
    await second
    await bus.close()


async def test_poison_messages_go_to_the_dead_letter_and_the_consumer_goes_on(settings: Settings):
    bus = await Bus.connect(settings, "t")
    subject = f"{settings.subject_prefix}.poison.RunStarted._"
    valid_json_invalid_event = json.dumps(
        {"type": "RunStarted", "version": 1, "search_id": "poison"}
    )
    for i, body in enumerate(
        [
            b"{oops",
            b'{"type": "Mystery"}',
            valid_json_invalid_event.encode(),
            b"{" + b" " * (2 * 1024 * 1024) + b"}",
        ]
    ):
        await bus.js.publish(subject, body, headers={"Nats-Msg-Id": f"poison-{i}"})
    good = search_started("poison")
    await bus.publish(good)
    recorder, stop = Recorder(), asyncio.Event()
    task = asyncio.create_task(consume(bus, "proj", [bus.subject_filter()], recorder, stop=stop))
    await eventually(lambda: recorder.seen, timeout=15, what="a delivery")
    stop.set()
    await task
    assert recorder.seen == [good]
    letters = await bus.dead_letters("proj")
    reasons = [h["Groundloop-Reason"] for h, _ in letters]
    assert len(letters) == 4
    assert "not JSON" in reasons[0]
    assert "unknown event type 'Mystery'" in reasons[1]
    assert "invalid RunStarted" in reasons[2]
    assert "over the 1,048,576-byte limit" in reasons[3]
    assert letters[3][0]["Groundloop-Body-Bytes"] == str(2 * 1024 * 1024 + 2)
    await bus.close()


async def test_rejected_event_is_dead_lettered_with_the_handlers_reason(settings: Settings):
    bus = await Bus.connect(settings, "t")

    async def refuses(event: ev.Event, delivery: Delivery) -> list[ev.Event]:
        raise Reject("patch escapes the workspace: ../etc/passwd")

    await bus.publish(search_started("rej"))
    stop = asyncio.Event()
    task = asyncio.create_task(
        consume(bus, "runner-cpu", [bus.subject_filter()], refuses, stop=stop)
    )
    letters = await eventually(
        lambda: bus.dead_letters("runner-cpu"), timeout=10, what="a dead letter"
    )
    stop.set()
    await task
    assert letters[0][0]["Groundloop-Reason"] == "patch escapes the workspace: ../etc/passwd"
    assert ev.decode(letters[0][1]).search_id == "rej"
    await bus.close()


async def test_outputs_are_published_and_reprocessing_is_skipped(settings: Settings):
    bus = await Bus.connect(settings, "t")
    start = search_started("outs")

    async def proposes(event: ev.Event, delivery: Delivery) -> list[ev.Event]:
        return [idea(event, 0), idea(event, 1)]

    await bus.publish(start)
    stop = asyncio.Event()
    task = asyncio.create_task(
        consume(bus, "ideator", [bus.subject_filter(type="SearchStarted")], proposes, stop=stop)
    )

    async def count() -> int:
        return len([e async for e in bus.events("outs")])

    async def all_three() -> bool:
        return await count() >= 3

    await eventually(all_three, timeout=15, what="the input and both outputs in the log")
    stop.set()
    await task
    assert await bus.was_processed("ideator", start.event_id)
    # A redelivered input re-derives the same ids; the log keeps one copy.
    for out in await proposes(start, None):  # type: ignore[arg-type]
        assert (await bus.publish(out)).duplicate
    assert await count() == 3
    await bus.close()


async def test_generation_advanced_is_stored_once_per_generation(settings: Settings):
    bus = await Bus.connect(settings, "t")
    start = search_started("gen")
    a = start.derive(
        ev.GenerationAdvanced, "evolver-a", generation=0, plan=ev.GenerationPlan(fresh=2)
    )
    b = start.derive(
        ev.GenerationAdvanced, "evolver-b", generation=0, plan=ev.GenerationPlan(fresh=3)
    )
    assert not (await bus.publish(a, once_per_subject=True)).refused
    assert (await bus.publish(b, once_per_subject=True)).refused
    assert [e async for e in bus.events("gen")] == [a]
    await bus.close()


async def test_exhausted_deliveries_are_recorded_never_lost(settings: Settings):
    settings = settings.model_copy(update={"max_deliver": 2, "ack_wait_s": 0.5})
    bus = await Bus.connect(settings, "t")
    start = search_started("exh")

    async def always_crashes(event: ev.Event, delivery: Delivery) -> list[ev.Event]:
        raise RuntimeError("segfault in user code")

    async def record_loss(event: ev.Event, reason: str) -> list[ev.Event]:
        return [event.derive(ev.SearchCompleted, "evolver", reason=f"lost: {reason}")]

    await bus.publish(start)
    stop = asyncio.Event()
    task = asyncio.create_task(
        consume(
            bus,
            "evolver",
            [bus.subject_filter(type="SearchStarted")],
            always_crashes,
            stop=stop,
            on_exhausted=record_loss,
        )
    )

    async def completed() -> list[ev.Event]:
        return [e async for e in bus.events("exh") if isinstance(e, ev.SearchCompleted)]

    await eventually(completed, timeout=20, what="the loss recorded as SearchCompleted")
    stop.set()
    await task
    [done] = await completed()
    assert "in 2 deliveries" in done.reason
    await bus.close()


async def test_trace_context_survives_a_publish_consume_hop(settings: Settings):
    exporter = InMemorySpanExporter()
    provider = telemetry.configure_tracing(
        settings.model_copy(update={"traces": "console"}), "test", exporter
    )
    bus = await Bus.connect(settings, "t")
    with telemetry.tracer().start_as_current_span("cli search") as root:
        await bus.publish(search_started("trace"))
    trace_id = root.get_span_context().trace_id
    recorder, stop = Recorder(), asyncio.Event()
    task = asyncio.create_task(consume(bus, "tracer", [bus.subject_filter()], recorder, stop=stop))
    await eventually(lambda: recorder.seen, timeout=15, what="a delivery")
    stop.set()
    await task
    handled = [s for s in exporter.get_finished_spans() if s.name == "tracer SearchStarted"]
    assert handled and handled[0].context.trace_id == trace_id
    assert handled[0].parent.span_id == root.get_span_context().span_id
    provider.shutdown()
    await bus.close()


async def test_unreachable_broker_gives_a_clear_error(tmp_path):
    from groundloop.broker import free_port

    settings = Settings(nats_url=f"nats://127.0.0.1:{free_port()}", data_dir=tmp_path)
    with pytest.raises(
        BrokerUnavailable, match="cannot reach NATS at nats://127.0.0.1:.*groundloop broker"
    ):
        await Bus.connect(settings, "t", connect_timeout=0.5)


async def test_artifacts_are_stored_once_replaced_cleanly_and_read_like_nats_py_objects(
    settings: Settings,
):
    """put_artifact writes a new key in two publishes; a redo of the same bytes keeps the
    stored object, new bytes replace it and purge its old chunks, so the bucket's stream holds
    one meta and the chunks of each key whatever was redone. Objects stay nats-py objects both
    ways, up to several chunks and down to none."""
    bus = await Bus.connect(settings, "runner-1")  # a role that writes artifacts
    stream = f"OBJ_{settings.artifacts_bucket}"

    async def stored_messages() -> int:
        return (await bus.js.stream_info(stream)).state.messages

    try:
        assert await bus.put_artifact("logs/r/1/000000", b"first") == "logs/r/1/000000"
        assert await bus.get_artifact("logs/r/1/000000") == b"first"
        assert await stored_messages() == 2  # one chunk, one meta
        nuid = (await bus._objects.get_info("logs/r/1/000000")).nuid
        await bus.put_artifact("logs/r/1/000000", b"first")
        assert (await bus._objects.get_info("logs/r/1/000000")).nuid == nuid  # kept
        assert await stored_messages() == 2
        await bus.put_artifact("logs/r/1/000000", b"redone")
        assert await bus.get_artifact("logs/r/1/000000") == b"redone"
        assert await stored_messages() == 2  # the old chunk purged, the old meta rolled up

        big = bytes(range(256)) * 1200  # 300 KiB: three chunks
        await bus.put_artifact("diffs/big", big)
        assert (await bus._objects.get("diffs/big")).data == big
        assert await bus.get_artifact("diffs/big") == big
        await bus.put_artifact("empty", b"")
        assert await bus.get_artifact("empty") == b""
        await bus._objects.put("by-nats-py", b"written by the library")
        assert await bus.get_artifact("by-nats-py") == b"written by the library"
        await bus.put_artifact("by-nats-py", b"written by the library")  # same bytes: kept
        await bus.put_artifact("by-nats-py", b"and replaced")
        assert (await bus._objects.get("by-nats-py")).data == b"and replaced"
        await bus._objects.delete("empty")
        await bus.put_artifact("empty", b"back")  # over a deleted object
        assert await bus.get_artifact("empty") == b"back"
    finally:
        await bus.close()


async def test_closing_while_the_broker_is_away_does_not_raise(tmp_path: Path):
    """A role stopped while its broker is down (reconnecting) closes its connection quietly:
    there is nothing to drain to."""
    server = NatsServer(tmp_path / "nats", free_port()).start()
    bus = await Bus.connect(Settings(nats_url=server.url, data_dir=tmp_path / "data"), "t")
    server.stop()
    await eventually(lambda: bus.nc.is_reconnecting, timeout=10, what="the bus reconnecting")
    await bus.close()
    assert bus.nc.is_closed
