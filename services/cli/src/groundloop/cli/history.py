"""History: carry a search's past into a new search (fork), and trade trajectories with the
paper's released format (export / import).

    fork(events_of_source, new_id, k, strategy=…, seed=…)  -> events of a new search carrying
                                                              generations < k, SearchStarted last
    export_paper(events)                                    -> one row per idea, the paper's fields
    import_paper(rows, search_id, environment)              -> a completed search's log
    await publish_all(bus, events)                          -> how many the log newly stored

Copied and imported events are facts, not work: their producer starts with "history:"
(groundloop.consumer.HISTORY_PREFIX), so the ideator, implementer and runners acknowledge them
without acting (no copied idea is implemented again, no copied patch is run again), while the
roles that fold state (evolver, projector) fold them. All ids are deterministic, so publishing
the same fork or import twice stores it once.

Pure functions apart from `publish_all`; the CLI (history_commands.py) reads and writes the log.
Fork lives in history_fork.py, the paper's format in paper_trajectories.py; their names are
re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from groundloop import events as ev
from groundloop.cli.history_error import HistoryError as HistoryError
from groundloop.cli.history_fork import fork as fork
from groundloop.cli.history_fork import history_producer as history_producer
from groundloop.cli.paper_trajectories import IMPORT_PRODUCER as IMPORT_PRODUCER
from groundloop.cli.paper_trajectories import MAX_IMPORTED_DIFF_BYTES as MAX_IMPORTED_DIFF_BYTES
from groundloop.cli.paper_trajectories import PAPER_FIELDS as PAPER_FIELDS
from groundloop.cli.paper_trajectories import export_paper as export_paper
from groundloop.cli.paper_trajectories import import_paper as import_paper
from groundloop.guarded_publish import publish_event

if TYPE_CHECKING:
    from groundloop.bus import Bus


async def publish_all(bus: Bus, events: list[ev.Event]) -> int:
    """Publish in order; returns how many the log stored anew (re-publishing the same fork or
    import stores nothing: same ids; a once-per-subject event, e.g. GenerationAdvanced, goes
    once per subject, and a stray message on that subject cannot take its place)."""
    stored = 0
    for event in events:
        result = await publish_event(bus, event)
        stored += not (result.duplicate or result.refused)
    return stored
