"""History without a broker: fork, export → import → export, and re-decide, on searches
recorded by the real evolver (`handle`) with plain stand-ins for the other services.

`Recorder` plays the log (an event id is stored once; one GenerationAdvanced per generation)
and the ideator, implementer and runners; like the real ones, those stand-ins ignore
"history:" events, so a fork or import that would make anything run again shows up here.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from datetime import UTC, datetime, timedelta

import pytest

from groundloop import events as ev
from groundloop.cli.history import HistoryError, export_paper, fork, import_paper
from groundloop.consumer import is_history
from groundloop.evolver.redecide import redecide
from groundloop.evolver.service import Deps, baseline_run_id, handle
from groundloop.execution.environment import Environment
from tests.factories import search_started

SYNTHETIC = Environment.load("synthetic")
MANIFEST = SYNTHETIC.manifest


class StepClock:
    def __init__(self) -> None:
        self.current = datetime(2025, 3, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current


def quality(idea_id: str) -> float:
    return int(hashlib.sha256(idea_id.encode()).hexdigest()[:8], 16) / 2**32


class Recorder:
    def __init__(self, fail_patch: float = 0.15, hold_generation: int | None = None):
        self.clock = StepClock()
        self.deps = Deps(environments=lambda name: MANIFEST, clock=self.clock)
        self.log: list[ev.Event] = []
        self.ids: set[str] = set()
        self.opened: set[tuple[str, int]] = set()
        self.queue: deque[ev.Event] = deque()
        self.fail_patch, self.hold_generation = fail_patch, hold_generation

    def publish(self, event: ev.Event) -> bool:
        if event.event_id in self.ids:
            return False
        if isinstance(event, ev.GenerationAdvanced):
            if (event.search_id, event.generation) in self.opened:
                return False
            self.opened.add((event.search_id, event.generation))
        self.ids.add(event.event_id)
        self.log.append(event)
        self.queue.append(event)
        return True

    def run(self, *events: ev.Event) -> Recorder:
        for event in events:
            self.publish(event)
        while self.queue:
            event = self.queue.popleft()
            self.clock.current += timedelta(seconds=1)
            for out in handle(event, self.deps):
                if self.publish(out):
                    self.deps.state(out.search_id).apply(out)
            if not is_history(event):  # what consume() does for every role but the folding ones
                for reaction in self.react(event):
                    self.publish(reaction)
        return self

    def at(self) -> datetime:
        return self.clock.current

    def react(self, e: ev.Event) -> list[ev.Event]:
        if isinstance(e, ev.GenerationAdvanced):
            p = e.plan
            modes = ["fresh"] * p.fresh + ["explore"] * p.explore + ["exploit"] * p.exploit
            return [
                e.derive(
                    ev.IdeaProposed,
                    "ideator",
                    i,
                    occurred_at=self.at(),
                    idea_id=ev.stable_id(e.search_id, e.generation, i),
                    generation=e.generation,
                    mode=mode,
                    parent_ids=p.exploit_context_ids if mode == "exploit" else [],
                    title=f"Idea {e.generation}.{i}",
                    text=f"[Experiment] change knob {i} [End]",
                    proposer=ev.ProposerInfo(kind="knobs"),
                    knobs={"MOMENTUM": 0.1 * i},
                )
                for i, mode in enumerate(modes)
            ]
        if isinstance(e, ev.IdeaProposed):
            if quality(e.idea_id) < self.fail_patch:
                return [
                    e.derive(
                        ev.PatchFailed,
                        "implementer",
                        occurred_at=self.at(),
                        idea_id=e.idea_id,
                        generation=e.generation,
                        attempts=2,
                        stage="apply",
                        last_error="no",
                    )
                ]
            return [
                e.derive(
                    ev.PatchReady,
                    "implementer",
                    occurred_at=self.at(),
                    patch_id=ev.stable_id("patch", e.idea_id),
                    idea_id=e.idea_id,
                    generation=e.generation,
                    environment="synthetic",
                    environment_digest="d" * 64,
                    diff=f"--- a/config.py\n+++ b/config.py\n@@ -1 +1 @@\n-A = 1\n+A = {e.idea_id[:6]!r}\n",
                    diff_digest="x",
                    patched_digest="y",
                    files_changed=["config.py"],
                    implementer=ev.ImplementerInfo(kind="knobs"),
                    preflight=ev.PreflightReport(passed=True),
                )
            ]
        if isinstance(e, ev.PatchReady):
            if e.generation == self.hold_generation:
                return []
            return self.execute(
                e, ev.stable_id(e.patch_id, e.seed), "search", e.idea_id, e.patch_id, e.seed
            )
        if isinstance(e, ev.RunRequested):
            return self.execute(e, e.run_id, e.purpose, e.idea_id, e.patch_id, e.seed)
        return []

    def execute(
        self,
        cause: ev.Event,
        run_id: str,
        purpose: str,
        idea_id: str | None,
        patch_id: str | None,
        seed: int,
    ) -> list[ev.Event]:
        score = 0.6 if idea_id is None else 0.4 + 0.4 * quality(idea_id)
        score += 0.001 * seed
        return [
            cause.derive(
                ev.RunStarted,
                "runner",
                0,
                occurred_at=self.at(),
                run_id=run_id,
                patch_id=patch_id,
                idea_id=idea_id,
                runner_id="r",
                host="h",
                seed=seed,
            ),
            cause.derive(
                ev.RunCompleted,
                "runner",
                1,
                occurred_at=self.at(),
                run_id=run_id,
                patch_id=patch_id,
                idea_id=idea_id,
                generation=getattr(cause, "generation", 0),
                purpose=purpose,
                status="succeeded",
                score=score,
                reward=score,
                metrics={"score": score},
                seed=seed,
            ),
        ]

    def of(self, cls: type[ev.Event], search_id: str | None = None) -> list:
        return [e for e in self.log if isinstance(e, cls) and search_id in (None, e.search_id)]

    def search(self, search_id: str) -> list[ev.Event]:
        return [e for e in self.log if e.search_id == search_id]


def started(
    search_id: str = "src", strategy: str = "evolution", **config: object
) -> ev.SearchStarted:
    values = {
        "generations": 3,
        "ideas_per_generation": 4,
        "baseline_seeds": 2,
        "final_top_k": 2,
        "final_seeds": 3,
        "context_size": 3,
        **config,
    }
    return search_started(
        search_id, strategy=strategy, occurred_at=datetime(2025, 3, 1, tzinfo=UTC), **values
    )


@pytest.fixture(scope="module")
def recorded() -> Recorder:
    world = Recorder().run(started())
    assert world.of(ev.SearchCompleted), "the source search must complete"
    assert world.of(ev.PatchFailed), "the story needs a failed patch"
    return world


def strings(value: object) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(strings(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(strings(v) for v in value)) if value else set()
    return set()


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


# ---------------------------------------------------------------------------- export / import


def test_export_then_import_then_export_round_trips(recorded: Recorder) -> None:
    rows = export_paper(recorded.search("src"))
    ideas = recorded.of(ev.IdeaProposed)
    assert len(rows) == len(ideas) == 12
    assert [r["epoch"] for r in rows] == sorted(r["epoch"] for r in rows)
    assert {tuple(r) for r in rows} == {
        ("ideator_model", "executor_model", "env", "epoch", "idea", "code_diff", "result")
    }
    failed = [r for r in rows if r["code_diff"] == ""]
    assert failed and all(r["result"] is None for r in failed)
    assert all(isinstance(r["result"], float) for r in rows if r["code_diff"])
    assert (
        rows[0]["ideator_model"] == rows[0]["executor_model"] == "knobs"
        and rows[0]["env"] == "synthetic"
    )
    assert rows[0]["idea"] == "Idea 0.0\n\n[Experiment] change knob 0 [End]"
    # mixed models, a patch whose run failed, and a result given as an integer
    patched = [i for i, r in enumerate(rows) if r["code_diff"]]
    rows[patched[0]] = {
        **rows[patched[0]],
        "ideator_model": "openai:gpt-x",
        "executor_model": "anthropic:claude-y",
    }
    rows[patched[1]] = {**rows[patched[1]], "result": None}
    rows[patched[2]] = {**rows[patched[2]], "result": 1}

    at = datetime(2025, 1, 1, tzinfo=UTC)
    imported = import_paper(rows, "imp", SYNTHETIC, occurred_at=at)
    assert import_paper(rows, "imp", SYNTHETIC, occurred_at=at) == imported  # deterministic ids
    assert all(e.producer == "history:import" and e.search_id == "imp" for e in imported)
    assert isinstance(imported[-1], ev.SearchStarted) and isinstance(
        imported[-2], ev.SearchCompleted
    )
    assert imported[-2].reason == "imported"
    assert imported[-1].environment_digest == SYNTHETIC.digest()
    assert [e.generation for e in imported if isinstance(e, ev.GenerationAdvanced)] == [0, 1, 2]
    statuses = [e.status for e in imported if isinstance(e, ev.RunCompleted)]
    assert statuses.count("failed") == 1 and len(statuses) == len(rows) - len(failed)

    again = export_paper(imported)
    expected = [{**r, "result": None if r["result"] is None else float(r["result"])} for r in rows]
    assert again == expected
    assert json.loads(json.dumps(again)) == again

    # nothing imported is acted on: a fresh evolver folds it as completed and decides nothing
    world = Recorder().run(*imported)
    assert world.log == imported


def test_import_rejects_rows_it_cannot_read() -> None:
    row = {
        "ideator_model": "m",
        "executor_model": "m",
        "env": "synthetic",
        "epoch": 0,
        "idea": "x",
        "code_diff": "",
        "result": None,
    }
    with pytest.raises(HistoryError, match="missing field"):
        import_paper([{"idea": "x"}], "imp", None)
    with pytest.raises(HistoryError, match="epoch must be"):
        import_paper([{**row, "epoch": -1}], "imp", None)
    with pytest.raises(HistoryError, match="2 environments"):
        import_paper([row, {**row, "env": "nanogpt"}], "imp", None)
    with pytest.raises(HistoryError, match="no rows"):
        import_paper([], "imp", None)


def test_datasets_loads_the_exported_jsonl(recorded: Recorder, tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = export_paper(recorded.search("src"))
    path = tmp_path / "trajectories.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert loaded.num_rows == len(rows)
    assert (
        loaded.features["result"].dtype == "float64" and loaded.features["epoch"].dtype == "int64"
    )
    assert loaded[0]["idea"] == rows[0]["idea"]
    assert [r["result"] for r in loaded] == [r["result"] for r in rows]


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
