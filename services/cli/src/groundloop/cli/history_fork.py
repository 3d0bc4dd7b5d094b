"""Fork for the CLI: groundloop.history_fork (shared with the API's `POST /searches/{id}/fork`)
with its refusals raised as the history commands' one error, HistoryError."""

from __future__ import annotations

from groundloop import events as ev
from groundloop import history_fork
from groundloop.cli.history_error import HistoryError
from groundloop.history_fork import history_producer as history_producer


def fork(
    events_of_source: list[ev.Event],
    new_search_id: str,
    from_generation: int,
    *,
    strategy: str | None = None,
    seed: int | None = None,
) -> list[ev.Event]:
    """groundloop.history_fork.fork: the events that start `new_search_id` from generation
    `from_generation` of a recorded search (SearchStarted last)."""
    try:
        return history_fork.fork(
            events_of_source, new_search_id, from_generation, strategy=strategy, seed=seed
        )
    except history_fork.ForkError as exc:
        raise HistoryError(str(exc)) from None
