"""History: fork a recorded search at a generation, continue it live, and re-decide a
recorded search (the evolver's decisions replayed from the log must match those recorded)."""

from __future__ import annotations

import pytest

from groundloop import events as ev
from groundloop.cli.history import HistoryError, fork
from groundloop.consumer import is_history
from groundloop.evolver.redecide import redecide
from groundloop.evolver.service import Deps, baseline_run_id
from tests.history_support import MANIFEST, Recorder, record_source, started, strings


@pytest.fixture(scope="module")
def recorded() -> Recorder:
    return record_source()


# ---------------------------------------------------------------------------- fork


def test_fork_keeps_generations_before_k_remaps_ids_and_starts_last(recorded: Recorder) -> None:
    source = recorded.search("src")
    copied = fork(source, "child", 2, strategy="best_of_n", seed=5)
    *past, start = copied
    assert isinstance(start, ev.SearchStarted) and start.producer == "cli"
    assert (start.forked_from, start.forked_generation, start.strategy, start.seed) == (
        "src",
        2,
        "best_of_n",
        5,
    )
    assert start.config == started().config and start.environment_digest == "d" * 64
    assert start.event_id == ev.stable_id("child", "SearchStarted")
    assert not any(isinstance(e, ev.SearchStarted | ev.SearchCompleted) for e in past)

    by_id = {e.event_id: e for e in source}
    for copy in past:
        original = by_id[copy.causation_id]  # linked to its source event
        assert copy.event_id == ev.stable_id("child", original.event_id)
        assert copy.producer == "history:" + original.producer and copy.search_id == "child"
        assert copy.occurred_at == original.occurred_at and type(copy) is type(original)
    assert sorted({e.generation for e in past if isinstance(e, ev.GenerationAdvanced)}) == [0, 1]
    assert all(
        e.generation < 2
        for e in past
        if isinstance(e, ev.IdeaProposed | ev.PatchReady | ev.PatchFailed)
    )
    kept_originals = [by_id[e.causation_id] for e in past]
    assert [by_id[e.causation_id] for e in past] == [
        e for e in source if e in kept_originals
    ]  # log order
    assert not [e for e in kept_originals if getattr(e, "purpose", None) == "reeval"]
    expected_ideas = {
        e.idea_id for e in source if isinstance(e, ev.IdeaProposed) and e.generation < 2
    }
    assert {
        by_id[e.causation_id].idea_id for e in past if isinstance(e, ev.IdeaProposed)
    } == expected_ideas
    # every search run of those ideas comes along, started and completed; no re-evaluation run
    reeval = {e.run_id for e in source if isinstance(e, ev.RunRequested) and e.purpose == "reeval"}
    runs = [
        e
        for e in source
        if isinstance(e, ev.RunStarted | ev.RunCompleted)
        and e.idea_id in expected_ideas
        and e.run_id not in reeval
    ]
    assert runs and {e.event_id for e in runs} <= {e.causation_id for e in past}
    assert not reeval & {by_id[e.causation_id].run_id for e in past if hasattr(e, "run_id")}

    old_ids = {
        getattr(e, f)
        for e in source
        for f in ("idea_id", "patch_id", "run_id")
        if isinstance(getattr(e, f, None), str)
    }
    payloads = strings([e.model_dump(mode="json", exclude={"causation_id"}) for e in past])
    assert not old_ids & payloads, "an entity id of the source leaked into the fork"
    new_ideas = {e.idea_id for e in past if isinstance(e, ev.IdeaProposed)}
    for e in past:
        if isinstance(e, ev.GenerationAdvanced):
            assert set(e.plan.exploit_context_ids + e.plan.explore_context_ids) <= new_ideas
            assert e.best_so_far is None or e.best_so_far.idea_id in new_ideas
        if isinstance(e, ev.IdeaProposed):
            assert set(e.parent_ids) <= new_ideas
    baseline = [e for e in past if isinstance(e, ev.RunCompleted) and e.purpose == "baseline"]
    assert {e.run_id for e in baseline} == {baseline_run_id("child", s) for s in (0, 1)}
    assert fork(source, "child", 2, strategy="best_of_n", seed=5)[:-1] == past  # deterministic


def test_a_fork_continues_live_and_runs_no_copied_patch(recorded: Recorder) -> None:
    world = Recorder()
    copied = fork(recorded.search("src"), "child", 1, strategy="best_of_n")
    world.run(*copied)
    log = world.search("child")
    (done,) = world.of(ev.SearchCompleted, "child")
    assert done.reason == "completed 3 generations"
    live = [e for e in log if not is_history(e)]
    assert [e.generation for e in live if isinstance(e, ev.GenerationAdvanced)] == [1, 2]
    assert all(
        e.plan.fresh == 4 and not e.plan.explore
        for e in live
        if isinstance(e, ev.GenerationAdvanced)
    )
    copied_patches = {e.patch_id for e in copied if isinstance(e, ev.PatchReady)}
    started_runs = [e for e in live if isinstance(e, ev.RunStarted)]
    search_runs = [
        e
        for e in started_runs
        if e.run_id not in {r.run_id for r in live if isinstance(r, ev.RunRequested)}
    ]
    assert {e.patch_id for e in search_runs} == {
        e.patch_id for e in live if isinstance(e, ev.PatchReady)
    }
    assert not {e.patch_id for e in search_runs} & copied_patches
    assert not [e for e in live if isinstance(e, ev.RunRequested) and e.purpose == "baseline"]
    assert redecide(
        log, Deps(environments=lambda name: MANIFEST)
    ).ok  # copies are facts, not decisions
    # synthetic has a final split, so the final baseline runs anew, on it
    final_baseline = [e for e in live if isinstance(e, ev.RunRequested) and e.idea_id is None]
    assert [(e.seed, e.purpose) for e in final_baseline] == [
        (0, "reeval"),
        (1, "reeval"),
        (2, "reeval"),
    ]


def test_a_fork_from_generation_zero_keeps_the_measured_baseline(recorded: Recorder) -> None:
    world = Recorder().run(*fork(recorded.search("src"), "zero", 0))
    live = [e for e in world.search("zero") if not is_history(e)]
    assert not [e for e in live if isinstance(e, ev.RunRequested) and e.purpose == "baseline"]
    assert [e.generation for e in live if isinstance(e, ev.GenerationAdvanced)] == [0, 1, 2]
    assert world.of(ev.SearchCompleted, "zero")


def test_fork_refuses_what_it_cannot_continue(recorded: Recorder) -> None:
    source = recorded.search("src")
    with pytest.raises(HistoryError, match="never opened generation 4"):
        fork(source, "child", 5)
    with pytest.raises(HistoryError, match="new search id"):
        fork(source, "src", 1)
    with pytest.raises(HistoryError, match="not a valid search id"):
        fork(source, "a.b", 1)
    waiting = Recorder(hold_generation=1).run(started("held"))
    with pytest.raises(HistoryError, match="have no result yet"):
        fork(waiting.search("held"), "child", 2)
    assert fork(waiting.search("held"), "child", 1)[-1].forked_generation == 1  # gen 0 is done


# ---------------------------------------------------------------------------- re-decide


def test_redecide_reproduces_a_recorded_search(recorded: Recorder) -> None:
    report = redecide(recorded.search("src"), Deps(environments=lambda name: MANIFEST))
    assert report.ok, [d.describe() for d in report.differences]
    decisions = [e for e in recorded.search("src") if e.producer == "evolver"]
    assert report.recorded == report.redecided == len(decisions) > 10
    assert report.state is not None and report.state.completed is not None


def test_redecide_reports_an_altered_and_a_missing_decision(recorded: Recorder) -> None:
    log = recorded.search("src")
    index = next(
        i for i, e in enumerate(log) if isinstance(e, ev.GenerationAdvanced) and e.generation == 1
    )
    ga = log[index]
    altered = ga.model_copy(
        update={"plan": ga.plan.model_copy(update={"explore": ga.plan.explore + 1})}
    )
    changed = log[:index] + [altered] + log[index + 1 :]
    report = redecide(changed, Deps(environments=lambda name: MANIFEST))
    assert [(d.kind, d.event_id, d.fields) for d in report.differences] == [
        ("changed", ga.event_id, ("plan",))
    ]
    assert "plan" in report.differences[0].describe()

    done = next(e for e in log if isinstance(e, ev.SearchCompleted))
    report = redecide([e for e in log if e is not done], Deps(environments=lambda name: MANIFEST))
    assert [(d.kind, d.type) for d in report.differences] == [("extra", "SearchCompleted")]
