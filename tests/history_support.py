"""A recorded search for the history tests (fork, export/import, re-decide) without a broker:
the real evolver (`handle`) with plain stand-ins for the other services.

`Recorder` plays the log (an event id is stored once; one GenerationAdvanced per generation)
and the ideator, implementer and runners; like the real ones, those stand-ins ignore
"history:" events, so a fork or import that would make anything run again shows up in a test.
"""

from __future__ import annotations

import hashlib
from collections import deque
from datetime import UTC, datetime, timedelta

from groundloop import events as ev
from groundloop.consumer import is_history
from groundloop.evolver.service import Deps, handle
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
                    self.deps.fold(out)
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


def record_source() -> Recorder:
    """The search "src", run to completion; it includes a failed patch."""
    world = Recorder().run(started())
    assert world.of(ev.SearchCompleted), "the source search must complete"
    assert world.of(ev.PatchFailed), "the story needs a failed patch"
    return world


def strings(value: object) -> set[str]:
    """Every string in a JSON-like value, at any depth: where a leaked id would hide."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(strings(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(strings(v) for v in value)) if value else set()
    return set()
