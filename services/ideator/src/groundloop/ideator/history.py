"""A search's history as the ideator needs it: settings, every idea, and how each one did.

A fold over the search's events (SearchStarted, IdeaProposed, PatchReady, PatchFailed,
RunCompleted), built by the service from the search's events that fit its log and passed to
`handle`, so tests build one from plain events. Ideas are ranked as on every other surface
(groundloop.ranking): by the mean reward of their succeeded search-split runs; final
re-evaluation runs are not search context. Prompts show the mean score and its run count.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

from groundloop import ranking
from groundloop.events import (
    Event,
    IdeaProposed,
    PatchFailed,
    PatchReady,
    RunCompleted,
    SearchStarted,
)


@dataclass
class IdeaRecord:
    idea_id: str
    generation: int
    mode: str
    title: str
    text: str
    knobs: dict[str, float | int | str] | None
    parent_ids: list[str]
    proposer_kind: str
    patch_error: str | None = None
    # (run id, score, reward) of each succeeded search-split run: what the idea is ranked by
    results: list[tuple[str, float, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # run statuses other than succeeded
    _standing: tuple[tuple, ranking.Standing | None] = field(
        default=((None,), None), init=False, repr=False, compare=False
    )

    @property
    def standing(self) -> ranking.Standing | None:
        # Every idea's standing is asked for each time the search is ranked (each generation,
        # and again by mean_reward and outcome): computed once per distinct set of results.
        results = tuple(self.results)
        if self._standing[0] != results:
            self._standing = (results, ranking.standing(self.idea_id, self.results))
        return self._standing[1]

    def copy(self) -> IdeaRecord:
        """A record that takes later results apart from this one."""
        twin = copy.copy(self)
        twin.results, twin.failures = list(self.results), list(self.failures)
        return twin

    @property
    def scores(self) -> list[float]:
        return [score for _, score, _ in self.results]

    @property
    def mean_reward(self) -> float | None:
        standing = self.standing
        return standing.mean_reward if standing else None

    @property
    def mean_score(self) -> float | None:
        standing = self.standing
        return standing.mean_score if standing else None

    @property
    def outcome(self) -> str:
        """One phrase for prompts: the score, or how it failed."""
        standing = self.standing
        if standing is not None:
            runs = f" (mean of {standing.runs} runs)" if standing.runs > 1 else ""
            return f"score {standing.mean_score:.6g}{runs}"
        if self.patch_error is not None:
            return "could not be implemented"
        if self.failures:
            return f"run {self.failures[-1]}"
        return "not measured yet"


@dataclass
class SearchHistory:
    search_id: str
    started: SearchStarted | None = None
    ideas: dict[str, IdeaRecord] = field(default_factory=dict)  # in proposal order
    baseline_scores: list[float] = field(default_factory=list)
    baseline_rewards: list[float] = field(default_factory=list)
    _patch_to_idea: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_events(cls, search_id: str, events: Iterable[Event]) -> SearchHistory:
        history = cls(search_id)
        for event in events:
            history.apply(event)
        return history

    def copy(self) -> SearchHistory:
        """A history that folds later events apart from this one."""
        return SearchHistory(
            self.search_id,
            self.started,
            {idea_id: record.copy() for idea_id, record in self.ideas.items()},
            list(self.baseline_scores),
            list(self.baseline_rewards),
            dict(self._patch_to_idea),
        )

    def apply(self, event: Event) -> None:
        if event.search_id != self.search_id:
            return
        if isinstance(event, SearchStarted):
            self.started = event
        elif isinstance(event, IdeaProposed):
            self.ideas.setdefault(
                event.idea_id,
                IdeaRecord(
                    idea_id=event.idea_id,
                    generation=event.generation,
                    mode=event.mode,
                    title=event.title,
                    text=event.text,
                    knobs=event.knobs,
                    parent_ids=list(event.parent_ids),
                    proposer_kind=event.proposer.kind,
                ),
            )
        elif isinstance(event, PatchReady):
            self._patch_to_idea[event.patch_id] = event.idea_id
        elif isinstance(event, PatchFailed):
            if event.idea_id in self.ideas:
                self.ideas[event.idea_id].patch_error = event.last_error
        elif isinstance(event, RunCompleted):
            self._apply_run(event)

    def _apply_run(self, run: RunCompleted) -> None:
        idea_id = run.idea_id or (self._patch_to_idea.get(run.patch_id) if run.patch_id else None)
        record = self.ideas.get(idea_id) if idea_id else None
        if not ranking.on_search_split(run.purpose):
            return  # final re-evaluations come after the search; they are not search context
        baseline = run.purpose == "baseline" or (record is not None and record.mode == "baseline")
        counted = ranking.RunResult(
            idea_id,
            run.purpose,
            run.score,
            run.reward,
            run_id=run.run_id,
            succeeded=run.status == "succeeded",
        ).counts
        if baseline:
            if counted:
                self.baseline_scores.append(run.score)  # type: ignore[arg-type]
                self.baseline_rewards.append(run.reward)
            return
        if record is None:
            return
        if counted:
            record.results.append((run.run_id, run.score, run.reward))  # type: ignore[arg-type]
        else:
            record.failures.append(run.status)

    # ------------------------------------------------------------------------- queries

    @property
    def baseline_reward(self) -> float | None:
        return ranking.mean(self.baseline_rewards) if self.baseline_rewards else None

    @property
    def baseline_score(self) -> float | None:
        return ranking.mean(self.baseline_scores) if self.baseline_scores else None

    def proposed(self) -> list[IdeaRecord]:
        """Ideas that came from a proposer (the unpatched baseline is not an idea)."""
        return [r for r in self.ideas.values() if r.mode != "baseline"]

    def records(self, ids: Iterable[str]) -> list[IdeaRecord]:
        return [self.ideas[i] for i in ids if i in self.ideas]

    def ranked(self, ids: Iterable[str] | None = None) -> list[IdeaRecord]:
        """Measured ideas among `ids` (default: all), best mean reward first."""
        pool = self.records(ids) if ids is not None else self.proposed()
        standings = {r.idea_id: r.standing for r in pool}
        scored = [r for r in pool if standings[r.idea_id] is not None]
        return sorted(scored, key=lambda r: ranking.rank_key(standings[r.idea_id]))  # type: ignore[arg-type]

    def above_baseline(self, ids: Iterable[str] | None = None) -> list[IdeaRecord]:
        base = self.baseline_reward
        ranked = self.ranked(ids)
        return ranked if base is None else [r for r in ranked if r.mean_reward > base]  # type: ignore[operator]
