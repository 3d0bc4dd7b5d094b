"""One search's analysis from the log: its events, the diffs too large to inline (object
store), and the environment's files when it is installed here (patches are then classified
by syntax tree, otherwise by their diff's lines; `class_basis` says which).

The CLI (`groundloop analyze`) and the API (`GET /searches/{id}/analysis`) both call
`analyze_logged`, so analysis.md and the dashboard show the same numbers.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from groundloop import events as ev
from groundloop.analysis.analyze import analyze_events
from groundloop.analysis.diversity import SimilarityMeasure
from groundloop.execution.environment import Environment
from groundloop.manifest import ManifestError
from groundloop.settings import Settings

if TYPE_CHECKING:
    from groundloop.analysis.idea_judge import IdeaJudge
    from groundloop.bus import Bus


async def read_events(bus: Bus, search_id: str) -> list[ev.Event]:
    """Every event of one search in log order (empty: the log has none)."""
    return [e async for e in bus.events(search_id)]


async def large_diffs(bus: Bus, events: list[ev.Event]) -> dict[str, str]:
    """Object-store key -> diff text of the patches too large to travel in their event."""
    keys = {
        e.diff_key for e in events if isinstance(e, ev.PatchReady) and e.diff is None and e.diff_key
    }
    return {key: (await bus.get_artifact(key)).decode() for key in sorted(keys)}


def environment_of(
    settings: Settings, started: ev.SearchStarted | None
) -> tuple[Environment | None, str]:
    """The search's environment when installed here, and what patches are classified by."""
    if started is None:
        return None, "the diff's lines (the log has no SearchStarted)"
    try:
        env = Environment.load(started.environment, settings.environments_dir)
    except (ManifestError, OSError):
        return None, f"the diff's lines (environment {started.environment} is not installed here)"
    same = env.digest() == started.environment_digest
    return env, (
        f"syntax trees of {env.name}'s files"
        + ("" if same else " (changed since the search ran; diffs that no longer apply: lines)")
    )


def analyze_with_environment(
    settings: Settings,
    events: list[ev.Event],
    diffs: dict[str, str],
    *,
    measure: SimilarityMeasure | None = None,
    judge: IdeaJudge | None = None,
) -> dict[str, Any]:
    """analyze_events with the installed environment's files, plus `class_basis` and `metric`
    (name and direction from the manifest; None when the environment is not here). CPU-bound
    (syntax trees, similarities): async callers run it in a thread."""
    started = next((e for e in events if isinstance(e, ev.SearchStarted)), None)
    env, basis = environment_of(settings, started)
    analysis = analyze_events(
        events,
        sources=env.editable_sources() if env else None,
        knob_names=[k.name for k in env.manifest.knobs] if env else (),
        diffs=diffs,
        measure=measure,
        judge=judge,
    )
    analysis["class_basis"] = basis
    analysis["metric"] = (
        {"name": env.manifest.metric.name, "direction": env.manifest.metric.direction}
        if env
        else None
    )
    return analysis


async def analyze_logged(
    bus: Bus,
    settings: Settings,
    search_id: str,
    *,
    measure: SimilarityMeasure | None = None,
    judge: IdeaJudge | None = None,
) -> dict[str, Any] | None:
    """The analysis of `search_id` as recorded in the log; None when the log has no event of
    it. The analysis runs in a worker thread, so the caller's event loop keeps serving."""
    events = await read_events(bus, search_id)
    if not events:
        return None
    diffs = await large_diffs(bus, events)
    return await asyncio.to_thread(
        analyze_with_environment, settings, events, diffs, measure=measure, judge=judge
    )
