"""Followers of a search's log on a real nats-server: each fold gets exactly its search's
entries, each once, in stream order, whatever interleaves, whatever happens to the follower's
consumer or the broker; garbage is quarantined once; unused followers are closed."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.broker import NatsServer, free_port
from groundloop.bus import Bus
from groundloop.log_follower import LogFollowers
from groundloop.quarantine import Quarantined
from groundloop.search_index import NOW, LogIndex, SearchFold, SearchIndex, fitting_events
from groundloop.settings import Settings
from tests import factories as f
from tests.factories import one_search
from tests.waiting import eventually


class Recorded:
    """A fold that keeps what it was given."""

    def __init__(self, search_id: str):
        self.search_id = search_id
        self.entries: list[tuple[int, ev.Event | Quarantined]] = []

    def add(self, seq: int, entry: ev.Event | Quarantined) -> None:
        self.entries.append((seq, entry))


class SlowRecorded(Recorded):
    """A fold that takes a while per entry and holds the event loop meanwhile, as a CPU-bound
    fold does: deliveries pile up in the socket and arrive in bursts."""

    def add(self, seq: int, entry: ev.Event | Quarantined) -> None:
        time.sleep(0.002)
        super().add(seq, entry)


async def publish_all(bus: Bus, events: list[ev.Event]) -> list[int]:
    return [(await bus.publish(event)).seq for event in events]


async def interleaved(bus: Bus, mine: list[ev.Event], others: list[ev.Event]) -> list[int]:
    """Publish `mine` with `others` in between; the stream sequences of `mine`."""
    seqs = []
    for a, b in itertools.zip_longest(mine, others):
        if a is not None:
            seqs.append((await bus.publish(a)).seq)
        if b is not None:
            await bus.publish(b)
    return seqs


async def stored(bus: Bus, search_id: str) -> list[tuple[int, ev.Event | Quarantined]]:
    return [pair async for pair in bus.entries(search_id)]


async def consumer_count(bus: Bus) -> int:
    return (await bus.js.stream_info(bus.settings.stream)).state.consumer_count


async def test_a_fold_gets_its_search_alone_in_order_while_others_interleave(settings: Settings):
    bus = await Bus.connect(settings, "t")
    mine, others = one_search("fa", ideas=4), one_search("fb", ideas=4)
    half = len(mine) // 2
    seqs = await interleaved(bus, mine[:half], others[: half + 3])
    followers = LogFollowers(bus, Recorded)

    fold = await followers.through("fa", seqs[2])
    assert [seq for seq, _ in fold.entries][:3] == seqs[:3]

    # Written while it follows, still interleaved with the other search.
    seqs += await interleaved(bus, mine[half:], others[half + 3 :])
    fold = await followers.through("fa", seqs[-1])
    assert fold.entries == await stored(bus, "fa")
    assert [e for _, e in fold.entries] == mine
    assert (await followers.to_end("fa")) is fold and len(fold.entries) == len(mine)

    assert (await followers.to_end("never-written")).entries == []
    await bus.close()
    after = await Bus.connect(settings, "t2")
    assert await consumer_count(after) == 0, "a consumer was left"
    await after.close()


async def test_garbage_is_quarantined_once_and_folded_as_such(settings: Settings):
    operator = await Bus.connect(settings, "t")
    events = one_search("fg", ideas=2)
    seqs = await publish_all(operator, events[:3])
    subject = f"{settings.subject_prefix}.fg.RunStarted._"
    garbage = (await operator.js.publish(subject, b"{oops", headers={"Nats-Msg-Id": "g1"})).seq
    seqs += await publish_all(operator, events[3:])

    readers = [await Bus.connect(settings, name) for name in ("implementer", "runner-cpu")]
    folds = [  # as the roles, with their permissions
        await LogFollowers(readers[0], Recorded).through("fg", seqs[-1]),
        await LogFollowers(readers[1], Recorded).to_end("fg"),
    ]
    for fold in folds:
        assert [seq for seq, _ in fold.entries] == sorted([*seqs, garbage])
        bad = dict(fold.entries)[garbage]
        assert isinstance(bad, Quarantined) and "not JSON" in bad.reason
    assert [q.seq for q in await operator.quarantined()] == [garbage]
    for bus in [*readers, operator]:
        await bus.close()


# A follower given far fewer pending messages than a burst holds: its subscription drops some.
# `stall_s` is long, so the direct read cannot be what fills a gap within the test's deadline.
TINY_PENDING = {"pending_msgs": 4, "stall_s": 60.0}


async def test_a_slow_fold_gets_every_entry_once_in_order_while_many_arrive(settings: Settings):
    bus = await Bus.connect(settings, "t")
    events = one_search("fs", ideas=15)  # 63 entries, many times the pending limit
    first = (await bus.publish(events[0])).seq
    followers = LogFollowers(bus, SlowRecorded, **TINY_PENDING)
    await followers.through("fs", first)

    def write_elsewhere() -> list[int]:  # a writer in another process: not slowed by the fold
        async def write() -> list[int]:
            writer = await Bus.connect(settings, "t2")
            try:
                return await publish_all(writer, events[1:])
            finally:
                await writer.close()

        return asyncio.run(write())

    seqs = await asyncio.to_thread(write_elsewhere)  # the follower folds meanwhile
    fold = await asyncio.wait_for(followers.through("fs", seqs[-1]), 30)
    assert fold.entries == await stored(bus, "fs")
    assert [e for _, e in fold.entries] == events
    await bus.close()


async def test_entries_dropped_by_a_full_subscription_are_delivered_again(
    settings: Settings, caplog: pytest.LogCaptureFixture
):
    bus = await Bus.connect(settings, "t")
    events = one_search("fp", ideas=15)
    seqs = await publish_all(bus, events)
    followers = LogFollowers(bus, Recorded, **TINY_PENDING)

    with caplog.at_level(logging.WARNING, "groundloop.log_follower"):
        # A new consumer sends the stored entries at once: far more than 4 at a time.
        fold = await asyncio.wait_for(followers.through("fp", seqs[-1]), 30)
    assert fold.entries == await stored(bus, "fp")
    assert [e for _, e in fold.entries] == events
    gaps = [r for r in caplog.records if "went missing" in r.getMessage()]
    assert gaps, "no entry was dropped: the burst did not exceed the pending limit"
    await bus.close()


async def test_a_follower_whose_consumer_is_deleted_goes_on_from_where_it_was(
    settings: Settings,
):
    bus = await Bus.connect(settings, "t")
    events = one_search("fd", ideas=4)
    seqs = await publish_all(bus, events[:5])
    followers = LogFollowers(bus, Recorded, stall_s=1.0)
    fold = await followers.through("fd", seqs[-1])

    for info in await bus.js.consumers_info(settings.stream):  # as an operator might
        await bus.js.delete_consumer(settings.stream, info.name)
    seqs += await publish_all(bus, events[5:])
    fold = await followers.through("fd", seqs[-1])
    assert fold.entries == await stored(bus, "fd")
    await bus.close()


async def test_a_follower_goes_on_after_the_broker_restarts(tmp_path: Path):
    server = NatsServer(tmp_path / "nats", free_port()).start()
    settings = Settings(nats_url=server.url, data_dir=tmp_path / "data")
    bus = await Bus.connect(settings, "t")
    events = one_search("fr", ideas=4)
    try:
        seqs = await publish_all(bus, events[:6])
        followers = LogFollowers(bus, Recorded, stall_s=1.0)
        assert len((await followers.through("fr", seqs[-1])).entries) == 6

        server.stop()
        await asyncio.get_running_loop().run_in_executor(None, server.start)
        seqs += await publish_all(bus, events[6:])  # retried until the bus reconnects
        fold = await followers.through("fr", seqs[-1])
        assert fold.entries == await stored(bus, "fr")
    finally:
        await bus.close()
        server.stop()


async def test_a_target_without_an_entry_of_the_search_is_read_directly(settings: Settings):
    bus = await Bus.connect(settings, "t")
    mine, others = one_search("fm", ideas=2), one_search("fo", ideas=2)
    await publish_all(bus, mine[:4])
    elsewhere = (await publish_all(bus, others))[-1]  # a sequence of another search
    followers = LogFollowers(bus, Recorded, stall_s=0.5)

    fold = await followers.through("fm", elsewhere)
    assert fold.entries == await stored(bus, "fm")
    await publish_all(bus, mine[4:])  # the follower starts again after the target
    fold = await followers.to_end("fm")
    assert fold.entries == await stored(bus, "fm") and len(fold.entries) == len(mine)
    await bus.close()


async def test_unused_followers_are_closed_and_start_over_when_needed(settings: Settings):
    bus = await Bus.connect(settings, "t")
    done = one_search("fe", ideas=1)  # ends with SearchCompleted
    going = one_search("fi", ideas=1)[:-1]
    await publish_all(bus, done + going)
    before = await consumer_count(bus)
    followers = LogFollowers(bus, Recorded, idle_s=1.0, ended_s=0.1)
    await followers.to_end("fe")
    await followers.to_end("fi")
    assert sorted(followers.following) == ["fe", "fi"]
    assert await consumer_count(bus) == before + 2

    await eventually(lambda: followers.following == ["fi"], timeout=5, what="ended one closed")
    await eventually(lambda: followers.following == [], timeout=5, what="idle one closed")
    # Dropped from `following` first, then its consumer deleted (a request: under load it
    # may still be on its way).
    await eventually(lambda: _count_is(bus, before), timeout=15, what="their consumers deleted")
    fold = await followers.to_end("fe")  # folded again, from its first entry
    assert [e for _, e in fold.entries] == done
    await bus.close()


async def _count_is(bus: Bus, expected: int) -> bool:
    return await consumer_count(bus) == expected


async def test_log_index_verdicts_are_those_of_the_log_before_each_entry(settings: Settings):
    """Whatever the order the index is asked in (deliveries, redeliveries, a replica that
    folded further), each entry gets the verdict of the log before it, recorded once."""
    bus = await Bus.connect(settings, "t")
    started = f.search_started("fv")
    gen = f.generation_advanced(started, 0, ev.GenerationPlan(fresh=2))
    idea = f.idea(gen, 0)
    unproposed = f.patch_ready(f.idea(gen, 1))  # its idea is never published
    ready = f.patch_ready(idea)
    second_gen = gen.model_copy(update={"event_id": "second-gen"})  # a second one, refused
    early = f.run_started(ready).model_copy(update={"event_id": "early-run"})
    log = [started, early, gen, idea, unproposed, ready, f.run_started(ready), second_gen]
    seqs = await publish_all(bus, log)

    expected = []
    for at, event in zip(seqs, log, strict=True):
        index = SearchIndex()
        for seq, before in zip(seqs, log, strict=True):
            if seq < at:
                index.observe(before, seq)
        expected.append(index.refusal(event, at))
    refusals = [why is not None for why in expected]
    assert refusals == [False, True, False, False, True, False, False, True]

    in_order = LogIndex(bus)
    assert [await in_order.refusal(e, s) for s, e in zip(seqs, log, strict=True)] == expected
    backwards = LogIndex(await Bus.connect(settings, "t2"))
    pairs = list(zip(seqs, log, strict=True))[::-1]
    assert [await backwards.refusal(e, s) for s, e in pairs] == expected[::-1]
    refused = [s for s, why in zip(seqs, expected, strict=True) if why is not None]
    assert sorted(q.seq for q in await bus.quarantined()) == refused

    class Fitting(SearchFold):
        def __init__(self, search_id: str):
            super().__init__(search_id)
            self.fitting: list[ev.Event] = []

        def fit(self, seq: int, event: ev.Event) -> None:
            self.fitting.append(event)

    fold = await LogFollowers(bus, Fitting).through("fv", seqs[-1])
    assert fold.fitting == fitting_events(log) and fold.index.exists("fv", NOW)
    await backwards.bus.close()
    await bus.close()


async def test_a_follower_that_cannot_go_on_wakes_its_waiters_at_once(tmp_path: Path):
    """The broker goes away while a caller waits: the follower, unable to open a new consumer,
    stops and wakes the caller, who then reads directly instead of sleeping out stall_s."""
    server = NatsServer(tmp_path / "nats", free_port()).start()
    settings = Settings(nats_url=server.url, data_dir=tmp_path / "data")
    bus = await Bus.connect(settings, "t")
    try:
        seqs = await publish_all(bus, one_search("fw", ideas=2)[:4])
        elsewhere = (await publish_all(bus, one_search("fx", ideas=1)))[-1]
        followers = LogFollowers(bus, Recorded, stall_s=300.0)
        assert len((await followers.through("fw", seqs[-1])).entries) == 4
        follower = followers._followers["fw"]

        waiting = asyncio.create_task(followers.through("fw", elsewhere))  # no entry of fw there
        await eventually(lambda: follower.waiters, timeout=5, what="the caller waiting")
        server.stop()
        await eventually(lambda: follower.task is None, timeout=60, what="the follower stopped")
        assert not follower.waiters  # it woke its waiter, which now reads directly
        await asyncio.get_running_loop().run_in_executor(None, server.start)
        fold = await asyncio.wait_for(waiting, 30)  # not the 300 s of stall_s
        assert fold.entries == await stored(bus, "fw")
    finally:
        await bus.close()  # also while the broker is away: closes without raising
        server.stop()
