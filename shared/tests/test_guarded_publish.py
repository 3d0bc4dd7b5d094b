"""The once-per-subject guard cannot be turned against the system, and dead letters are kept
one per role and message. Real nats-server; the readers are real consumer loops."""

from __future__ import annotations

import asyncio
import json

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.consumer import Delivery, consume, publish_outputs
from groundloop.guarded_publish import publish_event
from groundloop.settings import Settings
from tests.factories import generation_advanced, search_started
from tests.waiting import eventually

SEARCH = "guard"


class Recorder:
    def __init__(self) -> None:
        self.seen: list[ev.Event] = []

    async def __call__(self, event: ev.Event, delivery: Delivery) -> list[ev.Event]:
        self.seen.append(event)
        return []


def forged_on(subject: str, real: ev.GenerationAdvanced) -> list[tuple[bytes, str]]:
    """Messages a stranger can publish on a generation's subject ahead of the evolver."""
    wrong_producer = real.model_copy(update={"event_id": "forged-1", "producer": "mallory"})
    other_type = ev.IdeasShortfall(
        event_id="forged-2", search_id=SEARCH, producer="evolver", generation=real.generation,
        planned=3, proposed=0, reason="forged",
    )  # fmt: skip
    future = json.loads(ev.encode(real)) | {"version": 99, "event_id": "forged-3"}
    return [
        (b"{not json", "not JSON"),
        (ev.encode(wrong_producer), "mallory"),
        (ev.encode(other_type), "a subject of GenerationAdvanced"),
        (json.dumps(future).encode(), "invalid GenerationAdvanced"),
    ]


async def test_strays_ahead_of_the_evolver_never_block_the_real_generation(settings: Settings):
    bus = await Bus.connect(settings, "t")
    started = search_started(SEARCH)
    plan = ev.GenerationPlan(fresh=3)
    real = [generation_advanced(started, g, plan) for g in (0, 1)]
    await bus.publish(started)
    strays: dict[int, str] = {}
    for gen in real:  # every guarded subject of the search gets strays first
        subject = bus.subject_of(gen)
        for i, (body, reason) in enumerate(forged_on(subject, gen)):
            ack = await bus.js.publish(
                subject, body, headers={"Nats-Msg-Id": f"s{gen.generation}{i}"}
            )
            strays[ack.seq] = reason

    # Two replicas of the evolver race for generation 0 with different events: one wins.
    rival = real[0].model_copy(update={"event_id": "rival"})
    results = await asyncio.gather(publish_event(bus, real[0]), publish_event(bus, rival))
    assert sorted((r.refused, r.duplicate) for r in results) == [(False, False), (True, False)]
    winner = real[0] if not results[0].refused else rival
    again = await publish_event(bus, winner)  # a redelivered handler re-publishes its output
    assert again.duplicate and not again.refused
    await publish_outputs(bus, [real[1]])  # the consumer loop's path for handler outputs
    assert (await publish_event(bus, real[1].model_copy(update={"event_id": "late"}))).refused

    # A raw second GenerationAdvanced (bypassing the guard) is refused by every reader too.
    # Signed as the bus signs, when it does, so that only the guard's rule can refuse it.
    late = real[1].model_copy(update={"event_id": "raw-second"})
    subject, body = bus.subject_of(late), ev.encode(late)
    signed = bus.signer.headers(subject, body) if bus.signer is not None else {}
    ack = await bus.js.publish(subject, body, headers=signed)
    strays[ack.seq] = "a second GenerationAdvanced"

    readers = [Recorder(), Recorder()]
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(consume(bus, f"reader{i}", [bus.subject_filter()], r, stop=stop))
        for i, r in enumerate(readers)
    ]
    for i in range(2):
        await eventually(
            lambda i=i: _count(bus.dead_letters(f"reader{i}"), len(strays)),
            timeout=20,
            what=f"reader{i}'s dead letters",
        )
    await eventually(lambda: all(len(r.seen) == 3 for r in readers), timeout=10, what="events")
    stop.set()
    await asyncio.gather(*tasks)
    for reader in readers:
        assert [e.event_id for e in reader.seen] == [
            started.event_id,
            winner.event_id,
            real[1].event_id,
        ]
    # One dead letter per role and message (before: the original's message id collapsed the
    # letters of several roles into one), each with the role, reason, subject and sequence.
    for i in range(2):
        letters = await bus.dead_letters(f"reader{i}")
        assert sorted(int(h["Groundloop-Stream-Seq"]) for h, _ in letters) == sorted(strays)
        for headers, _ in letters:
            assert headers["Groundloop-Role"] == f"reader{i}"
            assert strays[int(headers["Groundloop-Stream-Seq"])] in headers["Groundloop-Reason"]
            assert headers["Groundloop-Subject"].startswith(f"{settings.subject_prefix}.{SEARCH}.")
    # And each stray is quarantined exactly once, whoever read it first.
    quarantined = await bus.quarantined()
    assert sorted(q.seq for q in quarantined) == sorted(strays)
    for q in quarantined:
        assert strays[q.seq] in q.reason, (q.reason, strays[q.seq])
    await bus.close()


async def _count(letters_coro, count: int):
    letters = await letters_coro
    assert len(letters) <= count, f"{len(letters)} dead letters, {count} expected"
    return len(letters) == count
