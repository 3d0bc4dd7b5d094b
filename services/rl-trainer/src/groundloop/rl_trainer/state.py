"""What the rl-trainer knows about one search: a fold of its log, current for every event.

The trainer keeps no state of its own that the log does not hold: which generations gave the
policy slots, which ideas the policy wrote for each (with the policy version that wrote them),
their rewards, and which policy steps were published. So a trainer killed at any point (even
mid-update) resumes from the log and the last published checkpoint, and two replicas reach the
same decisions.

Steps and versions. The policy's generations are numbered in order: the k-th generation with
`plan.rl > 0` is step k. Its group is sampled from policy version k (version 0 = the initial
policy after its warm-up) and trained into version k + 1, published as PolicyUpdated(step=k).

Rewards. An idea's reward is the reward of its first search run on the search split when that
run succeeded, and 0 when the run failed, was rejected, timed out or was killed, or when its
patch failed (the paper's rule). A group is ready for its update when every idea has a reward,
or when the search moved on without it (a later generation opened, or the search ended): the
ideas still without a result then count 0, and a result arriving later changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from groundloop.events import (
    Event,
    GenerationAdvanced,
    IdeaProposed,
    PatchFailed,
    PolicyUpdated,
    RunCompleted,
    SearchCompleted,
    SearchStarted,
    SearchStopped,
    stable_id,
)

PRODUCER = "rl-trainer"
RL_STRATEGIES = ("rl", "hybrid")


@dataclass
class Group:
    """One policy step: the generation's policy slots, their ideas and rewards."""

    step: int
    opened: GenerationAdvanced
    first_slot: int  # the ideator writes slots 0..first_slot-1 of the generation
    size: int
    ideas: dict[str, IdeaProposed] = field(default_factory=dict)  # idea id -> the policy's idea
    rewards: dict[str, float] = field(default_factory=dict)  # idea id -> reward (0 on failure)
    superseded: bool = False  # a later generation opened, or the search ended

    @property
    def generation(self) -> int:
        return self.opened.generation

    def idea_id(self, search_id: str, index: int) -> str:
        return stable_id(search_id, self.generation, self.first_slot + index)

    @property
    def sampled(self) -> bool:
        return len(self.ideas) >= self.size

    @property
    def complete(self) -> bool:
        return self.sampled and all(idea_id in self.rewards for idea_id in self.ideas)

    def ready(self) -> bool:
        """The update may run: every reward is in, or the search has moved on."""
        return self.complete or (self.sampled and self.superseded)

    def reward_list(self, search_id: str) -> list[float]:
        """Rewards in slot order; an idea with no result (yet) counts 0."""
        ids = [self.idea_id(search_id, i) for i in range(self.size)]
        return [self.rewards.get(idea_id, 0.0) for idea_id in ids]


@dataclass
class RLState:
    search_id: str
    started: SearchStarted | None = None
    groups: dict[int, Group] = field(default_factory=dict)  # step -> group
    updates: dict[int, PolicyUpdated] = field(default_factory=dict)  # step -> its event
    ideas: list[IdeaProposed] = field(default_factory=list)  # every idea, in log order
    rewards: dict[str, float] = field(default_factory=dict)  # idea id -> first search reward
    ended: Event | None = None
    _group_of_generation: dict[int, int] = field(default_factory=dict)

    @classmethod
    def fold(cls, search_id: str, events: Iterable[Event]) -> RLState:
        state = cls(search_id)
        for event in events:
            if event.search_id == search_id:
                state.apply(event)
        return state

    def copy(self) -> RLState:
        """An independent copy (the events themselves are frozen, so shared): the service
        advances one with what it publishes while its follower folds the log."""
        return RLState(
            self.search_id,
            self.started,
            groups={
                step: replace(group, ideas=dict(group.ideas), rewards=dict(group.rewards))
                for step, group in self.groups.items()
            },
            updates=dict(self.updates),
            ideas=list(self.ideas),
            rewards=dict(self.rewards),
            ended=self.ended,
            _group_of_generation=dict(self._group_of_generation),
        )

    @property
    def uses_policy(self) -> bool:
        return self.started is not None and self.started.strategy in RL_STRATEGIES

    def apply(self, event: Event) -> None:
        match event:
            case SearchStarted() if self.started is None:
                self.started = event
            case GenerationAdvanced() if event.generation not in self._group_of_generation:
                for group in self.groups.values():
                    if group.generation < event.generation:
                        group.superseded = True
                if event.plan.rl > 0:
                    step = len(self.groups)
                    plan = event.plan
                    self.groups[step] = Group(
                        step=step,
                        opened=event,
                        first_slot=plan.fresh + plan.explore + plan.exploit,
                        size=plan.rl,
                    )
                    self._group_of_generation[event.generation] = step
            case IdeaProposed():
                self.ideas.append(event)
                step = self._group_of_generation.get(event.generation)
                if event.mode == "rl" and step is not None:
                    self.groups[step].ideas.setdefault(event.idea_id, event)
            case RunCompleted() if event.purpose == "search" and event.idea_id is not None:
                reward = event.reward if event.status == "succeeded" else 0.0
                self._reward(event.idea_id, reward)
            case PatchFailed():
                self._reward(event.idea_id, 0.0)
            case PolicyUpdated():
                self.updates.setdefault(event.step, event)
            case SearchCompleted() | SearchStopped():
                self.ended = self.ended or event
                for group in self.groups.values():
                    group.superseded = True

    def _reward(self, idea_id: str, reward: float) -> None:
        if idea_id in self.rewards:
            return  # the first result counts; a redelivered or later run changes nothing
        self.rewards[idea_id] = reward
        for group in self.groups.values():
            if idea_id in group.ideas:
                group.rewards[idea_id] = reward

    # ------------------------------------------------------------------ what is due

    @property
    def version(self) -> int:
        """The newest published policy version (0: the initial policy)."""
        return len(self.updates)

    def due_update(self) -> Group | None:
        """The next group to train on: the oldest step without a PolicyUpdated, if ready."""
        group = self.groups.get(self.version)
        return group if group is not None and group.ready() else None

    def due_sample(self) -> Group | None:
        """The group to sample now: its step's policy is published and its ideas are not all
        written. Never after the search ended."""
        if self.ended is not None:
            return None
        group = self.groups.get(self.version)
        return group if group is not None and not group.sampled else None

    def earlier_texts(self, generation: int) -> list[str]:
        """Texts of every idea proposed before `generation` (for the novelty bonus)."""
        return [idea.text for idea in self.ideas if idea.generation < generation]

    def past_trajectories(self, generation: int, k: int) -> list[tuple[str, float]]:
        """The last `k` ideas before `generation` that have a result, with their reward."""
        past = [
            (idea.text, self.rewards[idea.idea_id])
            for idea in self.ideas
            if idea.generation < generation and idea.idea_id in self.rewards
        ]
        return past[-k:] if k > 0 else []

    def distinct_history(self) -> list[float]:
        """Distinct-idea fractions of the published steps, in step order."""
        return [
            u.distinct_fraction
            for _, u in sorted(self.updates.items())
            if u.distinct_fraction is not None
        ]
