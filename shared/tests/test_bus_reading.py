"""Bulk reads of the log (`groundloop.bus_reading`) against a real nats-server: every entry in
stream order once, up to the log's end as the read starts, the temporary consumer gone when
the read ends or is abandoned, and a slow reader holding back the broker."""

from __future__ import annotations

import asyncio
import contextlib
import time

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.bus_reading import HEARTBEAT_S, LOG_END
from groundloop.quarantine import Quarantined
from groundloop.settings import Settings
from tests.factories import one_search, search_started
from tests.waiting import eventually

BIG = 40_000  # bytes of one large entry: 400 of them are 8x the broker's first window (2 MiB)


async def consumers(bus: Bus) -> int:
    """Consumers on the log (listing them is the operator's: pass its bus)."""
    return len(await bus.js.consumers_info(bus.settings.stream))


async def publish_raw(bus: Bus, search_id: str, bodies: list[bytes]) -> list[int]:
    """Entries on the search's subjects as they are, not events; their stream sequences."""
    subject = f"{bus.settings.subject_prefix}.{search_id}.RunStarted._"
    return [(await bus.js.publish(subject, body)).seq for body in bodies]


def big_bodies(count: int) -> list[bytes]:
    return [f"{i:06d}".encode() * (BIG // 6) for i in range(count)]


async def test_replay_yields_every_entry_in_stream_order_with_the_garbage(settings: Settings):
    writer = await Bus.connect(settings, "t")
    reader = await Bus.connect(settings, "projector")  # a role: its permissions, not the operator's
    events = one_search("order", ideas=120) + one_search("other", ideas=40)  # 646 events
    stored: list[tuple[int, ev.Event | None]] = []  # None: garbage
    for i, event in enumerate(events):
        stored.append(((await writer.publish(event)).seq, event))
        if i % 50 == 7:
            (seq,) = await publish_raw(writer, event.search_id, [b"{not json"])
            stored.append((seq, None))

    entries = [pair async for pair in reader.entries()]

    assert [seq for seq, _ in entries] == [seq for seq, _ in stored]  # no gap, no duplicate
    for (seq, entry), (_, expected) in zip(entries, stored, strict=True):
        if expected is None:
            assert (
                isinstance(entry, Quarantined) and entry.seq == seq and "not JSON" in entry.reason
            )
        else:
            assert entry == expected
    assert [e async for e in reader.events()] == events
    assert await consumers(writer) == 0
    await reader.close(), await writer.close()


async def test_a_filter_by_search_yields_only_that_search(settings: Settings):
    writer = await Bus.connect(settings, "t")
    reader = await Bus.connect(settings, "projector")
    mine, theirs = one_search("mine", ideas=30), one_search("theirs", ideas=30)
    for a, b in zip(mine, theirs, strict=True):
        await writer.publish(a), await writer.publish(b)
    await writer.publish(one_search("late", ideas=1)[0])  # the log ends on another search

    assert [e async for e in reader.events("mine")] == mine
    assert [e async for e in reader.events("theirs")] == theirs
    started = time.perf_counter()
    assert [e async for e in reader.events("nobody")] == []
    assert time.perf_counter() - started < HEARTBEAT_S  # no search: answered, not waited out
    await reader.close(), await writer.close()


async def test_an_empty_log_returns_at_once(settings: Settings):
    bus, operator = await Bus.connect(settings, "projector"), await Bus.connect(settings, "t")
    started = time.perf_counter()
    assert [pair async for pair in bus.entries()] == []
    assert [m async for m in bus.stored_messages()] == []
    assert await bus.read_range(bus.subject_filter()) == []
    assert time.perf_counter() - started < HEARTBEAT_S
    assert await consumers(operator) == 0
    await bus.close(), await operator.close()


async def test_a_replay_stops_at_the_end_the_log_had_when_it_started(settings: Settings):
    writer = await Bus.connect(settings, "t")
    reader = await Bus.connect(settings, "projector")
    before = await publish_raw(writer, "busy", [b"%d" % i for i in range(2000)])

    messages = reader.stored_messages("busy")
    first = await anext(messages)  # the read has started: its end is fixed
    await publish_raw(writer, "busy", [b"after %d" % i for i in range(50)])
    rest = await asyncio.wait_for(_seqs(messages), timeout=30)
    assert [first.metadata.sequence.stream, *rest] == before

    # With publishers busy throughout, it still ends, on a prefix of the log without a gap.
    stop, later = asyncio.Event(), []

    async def keep_publishing() -> None:
        while not stop.is_set():
            later.extend(await publish_raw(writer, "busy", [b"later %d" % len(later)]))

    publisher = asyncio.create_task(keep_publishing())
    await eventually(lambda: later, timeout=5, what="the publisher started")
    replayed = await asyncio.wait_for(_seqs(reader.stored_messages("busy")), timeout=30)
    stop.set()
    await publisher
    everything = await _seqs(reader.stored_messages("busy"))
    assert replayed == [s for s in everything if s <= replayed[-1]]
    assert replayed[-1] >= later[0] and everything[-1] > replayed[-1]
    assert await consumers(writer) == 0
    await reader.close(), await writer.close()


async def _seqs(messages) -> list[int]:
    return [msg.metadata.sequence.stream async for msg in messages]


async def test_breaking_out_early_leaves_no_consumer(settings: Settings):
    writer = await Bus.connect(settings, "t")
    reader = await Bus.connect(settings, "projector")
    await publish_raw(writer, "early", big_bodies(200))

    async for _msg in reader.stored_messages("early"):
        assert await consumers(writer) == 1  # the read's own, while it reads
        break
    # The abandoned generator is closed by the event loop's finalizer, shortly after.
    await eventually(lambda: _none_left(writer), timeout=5, what="the consumer deleted")

    async with contextlib.aclosing(reader.entries()) as entries:
        async for _pair in entries:
            break
    assert await consumers(writer) == 0  # closed explicitly: deleted at once
    await reader.close(), await writer.close()


async def _none_left(bus: Bus) -> bool:
    return await consumers(bus) == 0


async def test_a_slow_reader_holds_back_the_broker(settings: Settings):
    """The reader answers flow control only for what its caller has taken, so while the
    caller dwells on its first entry the broker sends one window (2 MiB at first) and waits,
    through its stalled heartbeats, instead of growing the window each heartbeat."""
    writer = await Bus.connect(settings, "t")
    reader = await Bus.connect(settings, "projector")
    bodies = big_bodies(400)  # 16 MB
    await publish_raw(writer, "slow", bodies)

    received_before = reader.nc.stats["in_bytes"]
    messages = reader.stored_messages("slow")
    first = await anext(messages)
    await asyncio.sleep(3 * HEARTBEAT_S)  # stalled heartbeats come meanwhile
    held = reader.nc.stats["in_bytes"] - received_before
    assert held < 4 * 2**20, f"{held:,} bytes delivered to a reader that took one entry"

    rest = [msg async for msg in messages]
    assert [m.data for m in [first, *rest]] == bodies
    await reader.close(), await writer.close()


async def test_entries_deleted_meanwhile_end_the_read(settings: Settings):
    writer = await Bus.connect(settings, "t")
    reader = await Bus.connect(settings, "projector")
    seqs = await publish_raw(writer, "purged", big_bodies(400))

    messages = reader.stored_messages("purged")
    got = [(await anext(messages)).metadata.sequence.stream]
    await writer.js.purge_stream(settings.stream)  # what the reader holds is all it gets
    got += await asyncio.wait_for(_seqs(messages), timeout=4 * HEARTBEAT_S + 5)

    assert got == seqs[: len(got)] and len(got) < len(seqs)
    assert await consumers(writer) == 0
    await reader.close(), await writer.close()


async def test_a_consumer_deleted_mid_read_is_replaced_without_gap_or_duplicate(
    settings: Settings,
):
    writer = await Bus.connect(settings, "t")
    reader = await Bus.connect(settings, "projector")
    seqs = await publish_raw(writer, "lost", big_bodies(400))

    messages = reader.stored_messages("lost")
    got = [(await anext(messages)).metadata.sequence.stream]
    for info in await writer.js.consumers_info(settings.stream):
        await writer.js.delete_consumer(settings.stream, info.name)
    got += await asyncio.wait_for(_seqs(messages), timeout=30)

    assert got == seqs
    assert await consumers(writer) == 0
    await reader.close(), await writer.close()


async def test_read_range_returns_one_slice_of_a_subject(settings: Settings):
    writer = await Bus.connect(settings, "t")
    reader = await Bus.connect(settings, "projector")
    mine = one_search("ranged", ideas=10)
    seqs = []
    for event in mine:
        seqs.append((await writer.publish(event)).seq)
        await writer.publish(search_started(f"noise{len(seqs)}"))
    subject = reader.subject_filter(search_id="ranged")

    assert await reader.read_range(subject) == list(zip(seqs, mine, strict=True))
    assert await reader.read_range(subject, seqs[3], seqs[9]) == list(
        zip(seqs[3:9], mine[3:9], strict=True)
    )
    assert await reader.read_range(subject, seqs[3] + 1, seqs[4]) == []  # nothing between
    assert await reader.read_range(subject, seqs[-1] + 1, LOG_END) == []  # past its end
    assert await reader.read_range(subject, seqs[-2], seqs[-1] + 1) == list(
        zip(seqs[-2:], mine[-2:], strict=True)
    )
    assert await consumers(writer) == 0
    await reader.close(), await writer.close()
