"""A simulated search for the evolver's tests: `World` plays the log and the other services.

It keeps JetStream's two guarantees the evolver relies on (an event id is stored once; one
GenerationAdvanced per generation), folds each accepted evolver output at once (as
`EvolverLoop` does), delivers every event back to the evolver in log order, and answers like
the ideator, implementer and runners would, with scores the test chooses. No broker.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from groundloop.events import (
    Event,
    GenerationAdvanced,
    IdeaProposed,
    ImplementerInfo,
    PatchFailed,
    PatchReady,
    PreflightReport,
    ProposerInfo,
    RunCompleted,
    RunRequested,
    SearchCompleted,
    SearchStarted,
    Usage,
    stable_id,
)
from groundloop.evolver.service import Deps, handle, tick
from groundloop.evolver.state import SearchState
from groundloop.manifest import Budget, Manifest, Metric
from tests import factories

SEARCH = "s1"
BASELINE_LOSS = 3.0


def manifest(**metric: object) -> Manifest:
    return Manifest(
        name="synthetic",
        description="a closed-form environment for tests",
        entrypoint=["python", "train.py"],
        editable=["train.py"],
        seeds=[7, 8, 9],
        metric=Metric(name="val_loss", direction="minimize", reward="1/x", **metric),
        budget=Budget(wall_seconds=10),
        resource_class="cpu",
    )


class ManualClock:
    """A clock the test moves by hand (the evolver reads time only for deadlines)."""

    def __init__(self) -> None:
        self.current = datetime(2025, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


def search_started(strategy: str = "evolution", seed: int = 0, **config: object) -> SearchStarted:
    values: dict[str, object] = {
        "generations": 4,
        "ideas_per_generation": 6,
        "baseline_seeds": 2,
        "final_top_k": 2,
        "final_seeds": 3,
        **config,
    }
    return factories.search_started(SEARCH, seed=seed, strategy=strategy, **values)


def quality(idea_id: str) -> float:
    """A fixed pseudo-random quality in [0, 1) per idea."""
    return int(hashlib.sha256(idea_id.encode()).hexdigest()[:8], 16) / 2**32


def default_loss(idea_id: str | None, seed: int) -> float:
    base = BASELINE_LOSS if idea_id is None else BASELINE_LOSS + 0.3 - 0.6 * quality(idea_id)
    return base + 0.01 * (seed % 5)


class World:
    def __init__(
        self,
        *,
        manifest_: Manifest | None = None,
        loss: Callable[[str | None, int], float] = default_loss,
        fail_patch: Callable[[str], bool] = lambda idea_id: False,
        cost_per_idea: float = 0.0,
        gpu_seconds: float = 0.0,
        fail_runs: Callable[[str | None], bool] = lambda idea_id: False,
    ):
        self.clock = ManualClock()
        env = manifest_ or manifest()
        self.deps = Deps(environments=lambda name: env, clock=self.clock)
        self.log: list[Event] = []
        self.ids: set[str] = set()
        self.opened: set[int] = set()
        self.queue: deque[Event] = deque()
        self.held: dict[str, PatchReady] = {}  # patches whose run the test releases by hand
        self.hold: Callable[[str], bool] = lambda idea_id: False
        self.loss, self.fail_patch, self.fail_runs = loss, fail_patch, fail_runs
        self.cost_per_idea, self.gpu_seconds = cost_per_idea, gpu_seconds

    # -- the log
    def publish(self, event: Event) -> bool:
        if event.event_id in self.ids:
            return False  # JetStream duplicate
        if isinstance(event, GenerationAdvanced):
            if event.generation in self.opened:
                return False  # refused: once per subject
            self.opened.add(event.generation)
        self.ids.add(event.event_id)
        self.log.append(event)
        self.queue.append(event)
        return True

    def evolver_outputs(self, outputs: list[Event]) -> None:
        for out in outputs:
            assert out.producer == "evolver"
            if self.publish(out):
                self.deps.fold(out)

    def run(self, *events: Event, max_events: int = 5000) -> World:
        for event in events:
            self.publish(event)
        handled = 0
        while self.queue:
            event = self.queue.popleft()
            self.evolver_outputs(handle(event, self.deps))
            for reaction in self.react(event):
                self.publish(reaction)
            handled += 1
            assert handled < max_events, "the search does not converge"
        return self

    def tick(self) -> World:
        self.evolver_outputs(tick(self.deps))
        return self.run()

    # -- the other services
    def react(self, event: Event) -> list[Event]:
        if isinstance(event, GenerationAdvanced):
            return self.propose(event)
        if isinstance(event, IdeaProposed):
            return [self.implement(event)]
        if isinstance(event, PatchReady):
            if self.hold(event.idea_id):
                self.held[event.idea_id] = event
                return []
            return [self.complete(event, event.idea_id, event.seed, "search", event.patch_id)]
        if isinstance(event, RunRequested):
            return [
                self.complete(
                    event, event.idea_id, event.seed, event.purpose, event.patch_id, event.run_id
                )
            ]
        return []

    def propose(self, ga: GenerationAdvanced) -> list[Event]:
        plan = ga.plan
        modes = ["exploit"] * plan.exploit + ["explore"] * plan.explore + ["fresh"] * plan.fresh
        out = []
        for index, mode in enumerate(modes):
            parents = plan.exploit_context_ids if mode == "exploit" else []
            out.append(
                ga.derive(
                    IdeaProposed,
                    "ideator",
                    index,
                    idea_id=stable_id(SEARCH, ga.generation, index),
                    generation=ga.generation,
                    mode=mode,
                    parent_ids=parents,
                    title=f"idea {ga.generation}.{index}",
                    text="change a knob",
                    proposer=ProposerInfo(kind="knobs"),
                    usage=Usage(cost_usd=self.cost_per_idea),
                )
            )
        return out

    def implement(self, idea: IdeaProposed) -> Event:
        if self.fail_patch(idea.idea_id):
            return idea.derive(
                PatchFailed,
                "implementer",
                idea_id=idea.idea_id,
                generation=idea.generation,
                attempts=2,
                stage="apply",
                last_error="context mismatch",
            )
        return idea.derive(
            PatchReady,
            "implementer",
            patch_id=stable_id("patch", idea.idea_id),
            idea_id=idea.idea_id,
            generation=idea.generation,
            environment="synthetic",
            environment_digest="d" * 64,
            diff=f"diff for {idea.idea_id}\n",
            diff_digest="x",
            patched_digest="y",
            implementer=ImplementerInfo(kind="knobs"),
            preflight=PreflightReport(passed=True),
        )

    def complete(
        self,
        cause: Event,
        idea_id: str | None,
        seed: int,
        purpose: str,
        patch_id: str | None,
        run_id: str | None = None,
    ) -> RunCompleted:
        failed = self.fail_runs(idea_id)
        loss = self.loss(idea_id, seed)
        return cause.derive(
            RunCompleted,
            "runner",
            # A patch's run has the id the runner gives it (runs.py), which the log's
            # consistency checks expect (groundloop.search_index); requested runs keep theirs.
            run_id=run_id or stable_id(patch_id, seed),
            patch_id=patch_id,
            idea_id=idea_id,
            generation=getattr(cause, "generation", 0),
            purpose=purpose,
            status="failed" if failed else "succeeded",
            score=None if failed else loss,
            reward=0.0 if failed else 1 / loss,
            seed=seed,
            gpu_seconds=self.gpu_seconds,
        )

    def release(self, idea_id: str) -> World:
        patch = self.held.pop(idea_id)
        return self.run(self.complete(patch, idea_id, patch.seed, "search", patch.patch_id))

    # -- reading
    @property
    def state(self) -> SearchState:
        """The search as its log says (the evolver drops a state once its search ended)."""
        return self.deps.states.get(SEARCH) or SearchState.fold(self.log, SEARCH)

    def of(self, cls: type[Event]) -> list:
        return [e for e in self.log if isinstance(e, cls)]

    def generations(self) -> list[GenerationAdvanced]:
        return self.of(GenerationAdvanced)

    def completed(self) -> SearchCompleted:
        (done,) = self.of(SearchCompleted)
        return done


def decisions(events: list[Event]) -> list[dict]:
    """Evolver outputs without their wall-clock timestamp."""
    return [
        e.model_dump(mode="json", exclude={"occurred_at"})
        for e in events
        if e.producer == "evolver"
    ]
