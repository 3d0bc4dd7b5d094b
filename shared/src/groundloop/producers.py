"""Who may write what: the marks of copied history and the producer each guarded event needs.

Shared by the consumer loop (which acks copied history without acting on it), the guard of
the once-per-subject events (`groundloop.guarded_publish`) and the consistency checks of
`groundloop.search_index`, so that all three agree on who a producer is.
"""

from __future__ import annotations

from groundloop.events import Event

HISTORY_PREFIX = "history:"  # producer of events copied into a search by fork or import

# Event types of which each subject holds exactly one, and the role that writes that one.
# A message on such a subject that is not a valid event of this producer never counts.
ONE_PER_SUBJECT: dict[str, str] = {
    "GenerationAdvanced": "evolver",
    "IdeasShortfall": "ideator",
    "PolicyUpdated": "rl-trainer",
}
RUN_REQUESTER = "evolver"  # only the evolver asks for runs beyond a patch's first


def is_history(event: Event) -> bool:
    """Copied by fork/import: already happened, never to be acted on again."""
    return event.producer.startswith(HISTORY_PREFIX)


def original_producer(event: Event) -> str:
    """The role that first wrote `event` (a copy keeps it after the history mark)."""
    return event.producer.removeprefix(HISTORY_PREFIX)


def writes_guarded(event: Event) -> bool:
    """`event` is one of the once-per-subject types, written by the producer that type
    requires, or copied by fork or import (a copy keeps the original's place in its subject;
    imported trajectories name no original producer, only `history:import`)."""
    required = ONE_PER_SUBJECT.get(event.TYPE)
    return required is not None and (is_history(event) or original_producer(event) == required)
