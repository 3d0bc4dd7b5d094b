"""Garbage on the log's subjects, interleaved with a search: every reader (replay, a live
consumer, replay rebuild) gets exactly the valid events in order, nothing raises, and each
garbage entry is quarantined exactly once however many readers see it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from groundloop import events as ev
from groundloop.api.projector import project_all
from groundloop.api.rebuild import rebuild
from groundloop.api.store import create_tables, make_engine, table_snapshot
from groundloop.bus import MAX_EVENT_BYTES, Bus
from groundloop.consumer import Delivery, consume
from groundloop.quarantine import Quarantined, read_entry
from groundloop.settings import Settings
from tests.factories import one_search
from tests.waiting import eventually

SEARCH = "garb"


def garbage(prefix: str, valid: list[ev.Event]) -> list[tuple[str, bytes, str]]:
    """(subject, body, expected reason fragment) of each kind of garbage."""
    started, idea = valid[0], next(e for e in valid if isinstance(e, ev.IdeaProposed))
    on = f"{prefix}.{SEARCH}"
    future = json.loads(ev.encode(idea)) | {"version": 99, "event_id": "future"}
    other_search = started.model_copy(update={"search_id": "elsewhere", "event_id": "x1"})
    other_type = idea.model_copy(update={"event_id": "x2"})
    return [
        (f"{on}.RunStarted._", b"{oops", "not JSON"),
        (f"{on}.Mystery._", b'{"type": "Mystery", "search_id": "garb"}', "unknown event type"),
        (f"{on}.IdeaProposed._", json.dumps(future).encode(), "invalid IdeaProposed"),
        (f"{on}.RunStarted._", b"{" + b" " * MAX_EVENT_BYTES + b"}", "-byte limit"),
        (f"{on}.SearchStarted._", ev.encode(other_search), "of search 'elsewhere'"),
        (f"{on}.SearchStarted._", ev.encode(other_type), "a subject of SearchStarted"),
        (f"{on}.RunStarted._", ev.encode(idea)[:40] + b"\xe2\x82", "not JSON"),
        (f"{on}.RunStarted._", b"", "not JSON"),
        (f"{on}.RunStarted._", b"[1, 2]", "expected a JSON object, got list"),
        (f"{on}.RunStarted._", b"null", "got NoneType"),
        (f"{on}.SearchStarted", ev.encode(started), "is not"),  # a subject without its key
    ]


class Recorder:
    def __init__(self) -> None:
        self.seen: list[ev.Event] = []

    async def __call__(self, event: ev.Event, delivery: Delivery) -> list[ev.Event]:
        self.seen.append(event)
        return []


async def test_every_reader_skips_garbage_and_quarantines_it_once(
    settings: Settings, tmp_path: Path
):
    bus = await Bus.connect(settings, "t")
    valid = one_search(SEARCH, ideas=3)
    bad = garbage(settings.subject_prefix, valid)
    bad_seqs: dict[int, str] = {}
    for i, event in enumerate(valid):
        await bus.publish(event)
        if i < len(bad):  # one piece of garbage after each valid event, the rest at the end
            subject, body, reason = bad[i]
            ack = await bus.js.publish(subject, body, headers={"Nats-Msg-Id": f"bad-{i}"})
            bad_seqs[ack.seq] = reason
    for i in range(len(valid), len(bad)):
        subject, body, reason = bad[i]
        ack = await bus.js.publish(subject, body, headers={"Nats-Msg-Id": f"bad-{i}"})
        bad_seqs[ack.seq] = reason
    assert len(bad_seqs) == len(bad)

    # Reader 1: replay, twice, and from a second connection (no shared in-process memory).
    assert [e async for e in bus.events(SEARCH)] == valid
    assert [e async for e in bus.events()] == valid
    other = await Bus.connect(settings, "other")
    assert [e async for e in other.events(SEARCH)] == valid

    # Reader 2: a live consumer.
    recorder, stop = Recorder(), asyncio.Event()
    task = asyncio.create_task(
        consume(bus, "proj", [bus.subject_filter()], recorder, stop=stop, concurrency=1)
    )
    await eventually(lambda: len(recorder.seen) == len(valid), timeout=20, what="valid events")
    letters = await eventually(
        lambda: _enough(bus.dead_letters("proj"), len(bad)), timeout=20, what="dead letters"
    )
    stop.set()
    await task
    assert recorder.seen == valid
    assert sorted(int(h["Groundloop-Stream-Seq"]) for h, _ in letters) == sorted(bad_seqs)

    # Reader 3: replay rebuild gives the tables of the valid events alone.
    report = await rebuild(settings)
    assert report.events == report.applied == len(valid)
    expected = make_engine(f"sqlite:///{tmp_path / 'expected.db'}")
    create_tables(expected)
    project_all(expected, valid)
    assert table_snapshot(make_engine(settings.resolved_db_url())) == table_snapshot(expected)

    # Every garbage entry is quarantined exactly once, with its reason.
    records = await other.quarantined()
    assert sorted(q.seq for q in records) == sorted(bad_seqs)
    for record in records:
        assert bad_seqs[record.seq] in record.reason, (record.reason, bad_seqs[record.seq])
    entries = [entry async for _seq, entry in other.entries()]
    assert [e for e in entries if not isinstance(e, Quarantined)] == valid
    assert sorted(e.seq for e in entries if isinstance(e, Quarantined)) == sorted(bad_seqs)
    assert len(await bus.quarantined()) == len(bad)
    await other.close()
    await bus.close()


async def _enough(letters_coro, count: int):
    letters = await letters_coro
    return letters if len(letters) >= count else None


def test_one_reading_per_entry_is_shared_and_keyed_by_subject_and_bytes() -> None:
    """Readers of one process share a reading of the same stored bytes on the same subject
    (the same frozen event); a different subject or a changed byte is read afresh, and each
    kind of garbage gets its own verdict whether it is read first or again."""
    prefix = "gl"
    valid = one_search(SEARCH, ideas=1)
    for event in valid:
        subject = event.subject(prefix)
        body = ev.encode(event)
        first, again = (
            read_entry(prefix, subject, body),
            read_entry(prefix, subject, bytes(bytearray(body))),
        )
        assert first == event and again is first
        elsewhere = subject.replace(f".{SEARCH}.", ".elsewhere.", 1)
        assert "a subject of search 'elsewhere'" in read_entry(prefix, elsewhere, body)
        changed = body.replace(event.event_id.encode(), b"x" * len(event.event_id), 1)
        assert read_entry(prefix, subject, changed).event_id == "x" * len(event.event_id)
    for subject, body, reason in garbage(prefix, valid) * 2:
        assert reason in read_entry(prefix, subject, body)
