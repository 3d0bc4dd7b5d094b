"""The one reading of a log entry: an event, or a quarantined entry with the reason why not.

Every reader of the log (live consumers, start-up folds, replay rebuild, history commands,
`events tail`) turns stored bytes into an event through `read_entry`, so they all agree on
what is garbage: bytes over MAX_EVENT_BYTES, bad JSON, an unknown type, a version from the
future, or a valid event stored on a subject that is not its own (another search's or another
type's). `Bus.read` records such an entry once, keyed by its stream sequence, and every reader
skips it: garbage never stops a reader and never reaches a decision.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from groundloop.events import Event, InvalidEvent, decode

MAX_EVENT_BYTES = 1024 * 1024  # events stay small; logs, diffs, checkpoints go to the object store
KEPT_BYTES = 256 * 1024  # of a quarantined or dead-lettered body: enough to see what it was


@dataclass(frozen=True)
class Quarantined:
    """A log entry that is not a valid event: skipped by every reader, recorded once."""

    seq: int
    subject: str
    reason: str
    body: bytes = b""

    def __str__(self) -> str:
        return f"quarantined stream seq {self.seq} on {self.subject}: {self.reason}"


def read_entry(prefix: str, subject: str, data: bytes) -> Event | str:
    """The event stored as `data` on `subject`, or the reason it is not a valid entry."""
    if type(data) is bytes and len(data) <= MEMO_BYTES:
        return _read_entry_memo(prefix, subject, data)
    return _read_entry(prefix, subject, data)


def _read_entry(prefix: str, subject: str, data: bytes) -> Event | str:
    if len(data) > MAX_EVENT_BYTES:
        return (
            f"event body is {len(data):,} bytes, over the {MAX_EVENT_BYTES:,}-byte limit; "
            "large payloads belong in the object store (put_artifact) with a key in the event"
        )
    try:
        event = decode(data)
    except InvalidEvent as exc:
        return str(exc)
    return subject_mismatch(prefix, subject, event) or event


# One entry is read by every reader of a process that folds it: an embedded search read each
# entry ~5 times (28 readings per candidate, consumers and log followers), each a JSON parse
# and a validation. The reading is a pure function of (prefix, subject, bytes) and events are
# frozen, so the readers of a process share one. Bounded: entries up to MEMO_BYTES (events
# are a few KB), the MEMO_ENTRIES most recently read (readers of an entry come within moments).
MEMO_BYTES = 16 * 1024
MEMO_ENTRIES = 1024
_read_entry_memo = functools.lru_cache(maxsize=MEMO_ENTRIES)(_read_entry)


def subject_mismatch(prefix: str, subject: str, event: Event) -> str | None:
    """Why `event` does not belong on `subject` (`<prefix>.<search_id>.<Type>.<key>`), or
    None: an event of one search or type stored under another's subject would otherwise reach
    the readers of that search or type (a runner bound to PatchReady, a fold of one search)."""
    head = f"{prefix}."
    tokens = subject.removeprefix(head).split(".", 2) if subject.startswith(head) else []
    if len(tokens) != 3:
        return f"subject {subject!r} is not {prefix}.<search_id>.<type>.<key>"
    search_id, kind = tokens[0], tokens[1]
    if search_id != event.search_id:
        return (
            f"a {event.TYPE} of search {event.search_id!r} stored on {subject!r}, "
            f"a subject of search {search_id!r}"
        )
    if kind != event.TYPE:
        return f"a {event.TYPE} stored on {subject!r}, a subject of {kind} events"
    return None
