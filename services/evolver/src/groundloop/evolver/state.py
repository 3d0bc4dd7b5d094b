"""The evolver's state: a pure, deterministic fold over one search's events.

Consumes (folds) SearchStarted, GenerationAdvanced, IdeaProposed, IdeasShortfall, PatchReady,
PatchFailed, RunRequested, RunStarted, RunCompleted, SearchCompleted and SearchStopped; ignores
every other type. Emits nothing: `service.decide` reads this state to decide what to emit.
An IdeasShortfall lowers its generation's expected idea count to the ideas written; a
SearchStopped ends the search (first one wins): nothing more is decided for it.

    state = SearchState.fold(events)      # rebuild by replay
    state.apply(event)                    # one more event; False if it was already folded

Re-applying an event is a no-op (event ids are remembered), and facts keyed by entity ids
(a run completing twice, an idea proposed twice) are recorded once, first fact wins, so the
same log always folds to the same state, whatever was redelivered.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from groundloop.events import (
    Event,
    GenerationAdvanced,
    GenerationSummary,
    IdeaProposed,
    IdeasShortfall,
    PatchFailed,
    PatchReady,
    RunCompleted,
    RunRequested,
    RunStarted,
    Scored,
    SearchCompleted,
    SearchStarted,
    SearchStopped,
    Totals,
)

from .algorithm import PastIdea
from .budget import committed_runs, no_room_reason
from .records import TERMINAL_IDEA_STATUSES as TERMINAL_IDEA_STATUSES
from .records import TERMINAL_RUN_STATUSES as TERMINAL_RUN_STATUSES
from .records import GenerationRecord as GenerationRecord
from .records import IdeaRecord as IdeaRecord
from .records import Measured
from .records import PatchRef as PatchRef
from .records import RunRecord as RunRecord
from .stats import mean


@dataclass
class SearchState:
    search_id: str
    started: SearchStarted | None = None
    ideas: dict[str, IdeaRecord] = field(default_factory=dict)
    runs: dict[str, RunRecord] = field(default_factory=dict)
    generations: dict[int, GenerationRecord] = field(default_factory=dict)
    patch_ids: set[str] = field(default_factory=set)
    cost_usd: float = 0.0
    final_reason: str | None = None  # why the search stopped, fixed when re-evaluation begins
    completed: SearchCompleted | None = None
    stopped: SearchStopped | None = None  # the search cannot go on (see SearchStopped)
    applied: set[str] = field(default_factory=set)

    # ------------------------------------------------------------------ folding

    @classmethod
    def fold(cls, events: Iterable[Event], search_id: str | None = None) -> SearchState:
        state: SearchState | None = None
        for event in events:
            if search_id is not None and event.search_id != search_id:
                continue
            if state is None:
                state = cls(event.search_id)
            state.apply(event)
        if state is None:
            if search_id is None:
                raise ValueError("cannot fold an empty event list without a search_id")
            state = cls(search_id)
        return state

    def apply(self, event: Event) -> bool:
        """Fold one event; returns False (and changes nothing) if it was folded before or
        belongs to another search."""
        if event.event_id in self.applied or event.search_id != self.search_id:
            return False
        self.applied.add(event.event_id)
        apply = _APPLIERS.get(type(event))
        if apply is not None:
            apply(self, event)
        return True

    def _on_search_started(self, event: SearchStarted) -> None:
        if self.started is None:
            self.started = event

    def _on_generation_advanced(self, event: GenerationAdvanced) -> None:
        record = self._generation(event.generation)
        if record.event_id is None:  # exactly one per generation in the log; first wins anyway
            record.event_id, record.opened_at, record.plan = (
                event.event_id,
                event.occurred_at,
                event.plan,
            )
            if event.previous is not None:
                self._generation(event.previous.generation).summarised = True

    def _on_idea_proposed(self, event: IdeaProposed) -> None:
        self.cost_usd += event.usage.cost_usd
        if event.idea_id in self.ideas and self.ideas[event.idea_id].title:
            return  # a second proposal of the same idea id adds nothing
        idea = self._idea(event.idea_id, event.generation)
        idea.mode, idea.title, idea.parent_ids = event.mode, event.title, list(event.parent_ids)

    def _on_ideas_shortfall(self, event: IdeasShortfall) -> None:
        record = self._generation(event.generation)
        if record.shortfall is None:  # one per generation; first wins anyway
            record.shortfall = event.proposed

    def _on_patch_ready(self, event: PatchReady) -> None:
        self.cost_usd += event.usage.cost_usd
        self.patch_ids.add(event.patch_id)
        idea = self._idea(event.idea_id, event.generation)
        if idea.patch is None and idea.status != "patch_failed":
            idea.patch = PatchRef(event.patch_id, event.diff, event.diff_key, event.resource_class)
            idea.advance("patched")

    def _on_patch_failed(self, event: PatchFailed) -> None:
        self.cost_usd += event.usage.cost_usd
        idea = self._idea(event.idea_id, event.generation)
        if idea.status == "proposed":
            idea.status = "patch_failed"

    def _on_run_requested(self, event: RunRequested) -> None:
        if event.purpose == "reeval" and self.final_reason is None:
            # Decided before this run is counted: the budget that is spent, or else "the next
            # generation did not fit" (a function of the log, so every replay agrees).
            self.final_reason = self.stop_reason() or no_room_reason(self)
        if event.run_id not in self.runs:
            self.runs[event.run_id] = RunRecord(
                event.run_id,
                event.purpose,
                event.idea_id,
                event.seed,
                event.generation,
                event.patch_id,
            )

    def _on_run_started(self, event: RunStarted) -> None:
        run = self.runs.get(event.run_id)
        if run is None:  # a search run (its id is the runner's) or one requested before our log
            generation = self.ideas[event.idea_id].generation if event.idea_id in self.ideas else 0
            run = self.runs[event.run_id] = RunRecord(
                event.run_id, "search", event.idea_id, event.seed, generation, event.patch_id
            )
        if not run.terminal:
            run.status = "running"
        if run.purpose == "search" and run.idea_id in self.ideas:
            self.ideas[run.idea_id].advance("running")

    def _on_run_completed(self, event: RunCompleted) -> None:
        run = self.runs.get(event.run_id)
        if run is not None and run.terminal:
            return  # a second report of a finished run (e.g. a loss recorded after a late success)
        if run is None:
            run = self.runs[event.run_id] = RunRecord(
                event.run_id,
                event.purpose,
                event.idea_id,
                event.seed,
                event.generation,
                event.patch_id,
            )
        run.purpose, run.idea_id = event.purpose, event.idea_id if event.idea_id else run.idea_id
        run.status, run.score, run.reward = event.status, event.score, event.reward
        run.gpu_seconds = event.gpu_seconds
        if run.idea_id is not None:
            idea = self._idea(run.idea_id, event.generation)
            if run.run_id not in idea.run_ids:
                idea.run_ids.append(run.run_id)
            if run.purpose == "search":
                idea.advance("done")
        elif run.purpose == "baseline":
            self._generation(event.generation).baseline_run_ids.append(run.run_id)

    def _on_search_completed(self, event: SearchCompleted) -> None:
        if self.completed is None:
            self.completed = event

    def _on_search_stopped(self, event: SearchStopped) -> None:
        if self.stopped is None:
            self.stopped = event

    def _idea(self, idea_id: str, generation: int) -> IdeaRecord:
        """The idea, created on first sight; the log is ordered, but a fold must not crash on
        a PatchReady whose IdeaProposed it never saw (e.g. a fork that copied only part)."""
        if idea_id not in self.ideas:
            self.ideas[idea_id] = IdeaRecord(idea_id, generation, order=len(self.ideas))
            self._generation(generation).idea_ids.append(idea_id)
        return self.ideas[idea_id]

    def _generation(self, generation: int) -> GenerationRecord:
        return self.generations.setdefault(generation, GenerationRecord(generation))

    # ------------------------------------------------------------------ reading

    @property
    def current_generation(self) -> int | None:
        """The latest generation a GenerationAdvanced opened; None before generation 0."""
        opened = [g for g, record in self.generations.items() if record.event_id is not None]
        return max(opened) if opened else None

    @property
    def advanced_generations(self) -> list[int]:
        return sorted(g for g, record in self.generations.items() if record.event_id is not None)

    @property
    def ended(self) -> bool:
        """Completed or stopped: no decision is made for the search any more."""
        return self.completed is not None or self.stopped is not None

    @property
    def final_started(self) -> bool:
        return self.final_reason is not None

    def idea_runs(self, idea_id: str, purpose: str = "search") -> list[RunRecord]:
        return [
            self.runs[r] for r in self.ideas[idea_id].run_ids if self.runs[r].purpose == purpose
        ]

    def idea_scores(self, idea_id: str, purpose: str = "search") -> list[float]:
        """Metric values of the idea's succeeded runs of `purpose` (search or reeval)."""
        return list(self._measured(idea_id, purpose).scores)

    def idea_rewards(self, idea_id: str, purpose: str = "search") -> list[float]:
        return list(self._measured(idea_id, purpose).rewards)

    def idea_reward(self, idea_id: str, purpose: str = "search") -> float | None:
        return self._measured(idea_id, purpose).mean_reward

    def _measured(self, idea_id: str, purpose: str) -> Measured:
        idea = self.ideas[idea_id]
        known = idea.measured.get(purpose)
        if known is None or known.run_count != len(idea.run_ids):
            runs = [run for run in self.idea_runs(idea_id, purpose) if run.succeeded]
            rewards = [run.reward for run in runs]
            known = idea.measured[purpose] = Measured(
                len(idea.run_ids),
                [run.score for run in runs if run.score is not None],  # all: succeeded
                rewards,
                mean(rewards) if rewards else None,
            )
        return known

    def baseline_runs(self, purpose: str = "baseline") -> list[RunRecord]:
        """Completed unpatched runs of `purpose` ("baseline", or "reeval" for a final split)."""
        return [
            run
            for run in self.runs.values()
            if run.idea_id is None and run.purpose == purpose and run.terminal
        ]

    def beta(self) -> tuple[float, float] | None:
        """(β score, β reward): means over the succeeded baseline runs; None before any."""
        runs = [run for run in self.baseline_runs() if run.succeeded]
        if not runs:
            return None
        return mean([run.score for run in runs]), mean([run.reward for run in runs])  # type: ignore[misc]

    def generation_complete(self, generation: int) -> bool:
        """Every expected idea of the generation proposed and terminal (PatchFailed or run
        done); expected is the plan, or what the ideator wrote after an IdeasShortfall."""
        record = self.generations.get(generation)
        if record is None or record.event_id is None:
            return False
        ideas = [self.ideas[i] for i in record.idea_ids]
        return len(ideas) >= record.expected and all(idea.terminal for idea in ideas)

    def past_ideas(self, before_generation: int) -> list[PastIdea]:
        """Every proposed idea of earlier generations, in proposal order (`proposal_key`;
        baseline excluded)."""
        ideas = sorted(
            (
                i
                for i in self.ideas.values()
                if i.generation < before_generation and i.mode != "baseline"
            ),
            key=proposal_key,
        )
        return [
            PastIdea(i.idea_id, i.generation, self.idea_reward(i.idea_id), i.status) for i in ideas
        ]

    def ranked_ideas(self, purpose: str = "search") -> list[tuple[str, float]]:
        """(idea id, mean reward) of ideas with a result, best first; ties by proposal order."""
        scored = [(idea, self.idea_reward(idea.idea_id, purpose)) for idea in self.ideas.values()]
        ranked = sorted(
            ((i, r) for i, r in scored if r is not None),
            key=lambda p: (-p[1], proposal_key(p[0])),
        )
        return [(idea.idea_id, reward) for idea, reward in ranked]

    def best_so_far(self) -> Scored | None:
        ranked = self.ranked_ideas()
        if not ranked:
            return None
        best = ranked[0][0]
        return Scored(idea_id=best, score=mean(self.idea_scores(best)))

    def summary(self, generation: int) -> GenerationSummary:
        record = self.generations.get(generation, GenerationRecord(generation))
        ideas = [self.ideas[i] for i in record.idea_ids]
        succeeded = [i for i in ideas if self.idea_scores(i.idea_id)]
        # Best reward; a tie goes to the idea first in proposal order.
        best = min(
            succeeded,
            key=lambda i: (-(self.idea_reward(i.idea_id) or 0.0), proposal_key(i)),
            default=None,
        )
        return GenerationSummary(
            generation=generation,
            ideas=len(ideas),
            patched=sum(1 for i in ideas if i.patch is not None),
            succeeded=len(succeeded),
            best_score=mean(self.idea_scores(best.idea_id)) if best else None,
            mean_score=mean([mean(self.idea_scores(i.idea_id)) for i in succeeded])
            if succeeded
            else None,
        )

    def totals(self) -> Totals:
        finished = [run for run in self.runs.values() if run.terminal]
        return Totals(
            ideas=sum(1 for i in self.ideas.values() if i.mode != "baseline"),
            patches=len(self.patch_ids),
            runs=len(finished),
            gpu_seconds=sum(run.gpu_seconds for run in finished),
            cost_usd=self.cost_usd,
        )

    # ------------------------------------------------------------------ budgets

    def runs_committed(self) -> int:
        """Every run in the log or still to come from an open generation, re-evaluation
        included: the run budget's meter (see budget.py)."""
        return committed_runs(self)

    def remaining_runs(self) -> int | None:
        limit = self.started.config.budgets.max_runs if self.started else None
        return None if limit is None else limit - self.runs_committed()

    def stop_reason(self, next_generation: int | None = None) -> str | None:
        """Why no further generation may open (a budget spent, or all generations done)."""
        if self.started is None:
            return None
        config, budgets = self.started.config, self.started.config.budgets
        following = (
            next_generation if next_generation is not None else (self.current_generation or 0) + 1
        )
        remaining = self.remaining_runs()
        if remaining is not None and remaining <= 0:
            return f"budget spent: runs ({self.runs_committed()} of {budgets.max_runs})"
        gpu_seconds = self.totals().gpu_seconds
        if budgets.gpu_hours is not None and gpu_seconds >= budgets.gpu_hours * 3600:
            return f"budget spent: GPU-hours ({gpu_seconds / 3600:.3g} of {budgets.gpu_hours:g})"
        if budgets.dollars is not None and self.cost_usd >= budgets.dollars:
            return f"budget spent: dollars ({self.cost_usd:.2f} of {budgets.dollars:.2f})"
        if budgets.max_generations is not None and following >= budgets.max_generations:
            return f"budget spent: generations ({budgets.max_generations})"
        if following >= config.generations:
            return f"completed {config.generations} generations"
        return None


def proposal_key(idea: IdeaRecord) -> tuple[int, bool, int]:
    """Proposal order as every run of the search sees it: by generation, the ideator's ideas
    before the policy's, each proposer's in the order it wrote them. Two proposers write a
    hybrid generation at once, so where their ideas interleave in the log depends on timing;
    Algorithm 1 samples its context in this order, and the same ideas and results must make
    the same plan."""
    return idea.generation, idea.mode == "rl", idea.order


_APPLIERS = {
    SearchStarted: SearchState._on_search_started,
    GenerationAdvanced: SearchState._on_generation_advanced,
    IdeaProposed: SearchState._on_idea_proposed,
    IdeasShortfall: SearchState._on_ideas_shortfall,
    PatchReady: SearchState._on_patch_ready,
    PatchFailed: SearchState._on_patch_failed,
    RunRequested: SearchState._on_run_requested,
    RunStarted: SearchState._on_run_started,
    RunCompleted: SearchState._on_run_completed,
    SearchCompleted: SearchState._on_search_completed,
    SearchStopped: SearchState._on_search_stopped,
}
