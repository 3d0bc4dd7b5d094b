"""Fork: the events that start a new search from a generation of a recorded one.

Copies are facts, not work: their producer is "history:<original>" (see groundloop.cli.history
for why), and every id is derived deterministically, so publishing a fork twice stores it once.
Pure, and shared by both front ends: `groundloop fork` (groundloop.cli.history_fork) and
`POST /searches/{id}/fork` (groundloop.api.routes_control). A fork that cannot be done as
asked raises ForkError, whose message says why and how.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from groundloop import events as ev
from groundloop.producers import HISTORY_PREFIX


class ForkError(ValueError):
    """A fork that cannot be done as asked; the message says why and how."""


_ENVELOPE = {"event_id", "search_id", "causation_id", "producer", "occurred_at", "type", "version"}
_IDEA_FACTS = (ev.IdeaProposed, ev.PatchReady, ev.PatchFailed)


def history_producer(producer: str) -> str:
    """The producer "history:<producer>"; never doubly prefixed (fork of a fork or an import)."""
    return producer if producer.startswith(HISTORY_PREFIX) else HISTORY_PREFIX + producer


def _source_started(events: list[ev.Event]) -> ev.SearchStarted:
    started = next((e for e in events if isinstance(e, ev.SearchStarted)), None)
    if started is None:
        raise ForkError(
            "the source has no SearchStarted: is the search id right? "
            "(`groundloop searches` lists them)"
        )
    return started


def fork(
    events_of_source: list[ev.Event],
    new_search_id: str,
    from_generation: int,
    *,
    strategy: str | None = None,
    seed: int | None = None,
) -> list[ev.Event]:
    """The events that start `new_search_id` from generation `from_generation` (k) of a
    recorded search: its baseline runs, GenerationAdvanced of g < k, and the ideas of
    generations < k with their patches and search runs (no re-evaluation runs, no
    SearchCompleted), then a live SearchStarted LAST, so an evolver that folded the copied
    past opens generation k when it sees it.

    Copies get event_id = stable_id(new id, old event id), causation_id = the original event
    (the link to the source), producer "history:<original>", the original occurred_at, and
    every entity id (ideas, patches, runs, parents, plan contexts, best-so-far) remapped to
    stable_id(new id, old id), because projections key them globally. Baseline runs are the
    exception: they map to the new search's own baseline run ids (stable_id(new id,
    "baseline", seed), the evolver's `baseline_run_id`), so the fork's evolver finds its
    baseline measured and its final re-evaluation reuses it, exactly as the source did.
    """
    if not ev.is_valid_search_id(new_search_id):
        raise ForkError(f"{new_search_id!r} is not a valid search id ({ev.SEARCH_ID_PATTERN})")
    if from_generation < 0:
        raise ForkError(f"--from-generation must be ≥ 0, got {from_generation}")
    source = _source_started(events_of_source)
    if new_search_id == source.search_id:
        raise ForkError("a fork needs a new search id, not the source's")
    events = [e for e in events_of_source if e.search_id == source.search_id]
    k = from_generation

    idea_generation: dict[str, int] = {}
    for e in events:
        if isinstance(e, _IDEA_FACTS):
            idea_generation.setdefault(e.idea_id, e.generation)
    runs_of = {
        p: {
            e.run_id
            for e in events
            if isinstance(e, ev.RunRequested | ev.RunCompleted) and e.purpose == p
        }
        for p in ("baseline", "reeval")
    }
    baseline_seed = {
        e.run_id: e.seed
        for e in events
        if isinstance(e, ev.RunRequested | ev.RunCompleted) and e.purpose == "baseline"
    }
    _check_forkable(events, source, k, idea_generation)

    def copied(e: ev.Event) -> bool:
        if isinstance(e, ev.GenerationAdvanced):
            return e.generation < k
        if isinstance(e, _IDEA_FACTS):
            return e.generation < k
        if isinstance(e, ev.RunRequested | ev.RunStarted | ev.RunCompleted):
            if e.run_id in runs_of["baseline"]:
                return True
            return (
                e.run_id not in runs_of["reeval"]
                and e.idea_id is not None
                and idea_generation.get(e.idea_id, k) < k
            )
        return False  # SearchStarted, SearchCompleted, PolicyUpdated

    ids: dict[str, str] = {}
    for e in events:
        for field in ("idea_id", "patch_id", "run_id"):
            old = getattr(e, field, None)
            if isinstance(old, str):
                ids[old] = ev.stable_id(new_search_id, old)
    for run_id, run_seed in baseline_seed.items():
        ids[run_id] = ev.stable_id(new_search_id, "baseline", run_seed)

    out = [_copy(e, new_search_id, ids) for e in events if copied(e)]
    out.append(
        ev.SearchStarted(
            event_id=ev.stable_id(new_search_id, "SearchStarted"),
            search_id=new_search_id,
            causation_id=source.event_id,
            producer="cli",
            environment=source.environment,
            environment_digest=source.environment_digest,
            strategy=strategy or source.strategy,  # type: ignore[arg-type]
            config=source.config,
            proposer=source.proposer,
            implementer=source.implementer,
            price_table=source.price_table,
            seed=source.seed if seed is None else seed,
            forked_from=source.search_id,
            forked_generation=k,
        )
    )
    return out


def _check_forkable(
    events: list[ev.Event], source: ev.SearchStarted, k: int, idea_generation: dict[str, int]
) -> None:
    """Generation k-1 must have opened, and every idea before k must have its result: a copied
    idea still waiting would wait forever (its patch is history, no runner takes it)."""
    opened = {e.generation for e in events if isinstance(e, ev.GenerationAdvanced)}
    if k > 0 and k - 1 not in opened:
        last = max(opened) if opened else None
        raise ForkError(
            f"search {source.search_id} never opened generation {k - 1}; fork from a generation "
            f"≤ {0 if last is None else last + 1}"
        )
    terminal = {e.idea_id for e in events if isinstance(e, ev.PatchFailed)}
    terminal |= {
        e.idea_id
        for e in events
        if isinstance(e, ev.RunCompleted) and e.purpose == "search" and e.idea_id is not None
    }
    waiting = sorted(i for i, g in idea_generation.items() if g < k and i not in terminal)
    if waiting:
        raise ForkError(
            f"{len(waiting)} idea(s) of generations < {k} in {source.search_id} have no result yet "
            f"(e.g. {waiting[0]}); let the search finish them, or fork from an earlier generation"
        )


def _copy(event: ev.Event, new_search_id: str, ids: Mapping[str, str]) -> ev.Event:
    data = event.model_dump()
    for key, value in data.items():
        if key not in _ENVELOPE:
            data[key] = _remap(value, ids)
    data.update(
        event_id=ev.stable_id(new_search_id, event.event_id),
        search_id=new_search_id,
        causation_id=event.event_id,
        producer=history_producer(event.producer),
    )
    return type(event).model_validate(data)


def _remap(value: Any, ids: Mapping[str, str]) -> Any:
    """Every string that is a known entity id, anywhere in a payload, mapped to its new id."""
    if isinstance(value, str):
        return ids.get(value, value)
    if isinstance(value, list):
        return [_remap(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: _remap(v, ids) for k, v in value.items()}
    return value
