"""The rl-trainer: GRPO on an ideator policy from execution reward, on the live event stream.

For searches with strategy "rl" or "hybrid" (SearchStarted.rl), each generation whose plan
gives the policy slots (`plan.rl`) is one policy step (`state.py` numbers them):

  GenerationAdvanced g   → sample a group of plan.rl ideas from policy version k, store the
                           exact samples, publish them as IdeaProposed (mode "rl", proposer
                           kind "rl", policy_version k); they are patched and run like any idea
  RunCompleted/PatchFailed of the group's ideas → rewards (0 for anything but a succeeded run)
  group complete (or the search moved on) → one GRPO update (anti-collapse bonuses optional),
                           checkpoint v(k+1) to the object store, PolicyUpdated(step=k) with
                           mean/max reward, diversity, KL, loss — published once per step (the
                           once-per-subject guard), so a step is never applied twice
  next GenerationAdvanced → sampled from v(k+1).

The trainer holds nothing the log does not: every event starts from the search's log as it
is now (`RLState`, folded as the log is written by the process's follower of the search,
each entry read once), the current policy is the last PolicyUpdated's checkpoint (version 0:
the warmed-up initial policy, stored once), and every output id is a function of the
decision (step, slot). A trainer killed with SIGKILL mid-update therefore redoes that update
from the same checkpoint and the same stored samples, and the guard keeps one PolicyUpdated
per step.

Why not trl's GRPOTrainer: it calls the reward function synchronously inside its training
loop, while our rewards arrive minutes later as RunCompleted events from other processes; so
sampling and the update are separate calls here, and `grpo.py` builds the update from trl's
lower-level pieces (see its docstring).

Run alone:  python -m groundloop.rl_trainer   (GROUNDLOOP_NATS_URL; needs torch, transformers, trl)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nats.js.errors import ObjectNotFoundError

from groundloop.bus import Bus, describe
from groundloop.consumer import Delivery
from groundloop.events import (
    Event,
    GenerationAdvanced,
    PatchFailed,
    RunCompleted,
    SearchCompleted,
    SearchStopped,
    stable_id,
)
from groundloop.execution.environment import Environment
from groundloop.guarded_publish import publish_event
from groundloop.log_follower import LogFollowers
from groundloop.rl_trainer.checkpoints import initial_key, load_checkpoint
from groundloop.rl_trainer.policy import Policy, SamplingContext, build_policy
from groundloop.rl_trainer.state import PRODUCER, RL_STRATEGIES, RLState
from groundloop.rl_trainer.steps import (
    PolicyUnavailable,
    ideator_prompt,
    sample_group,
    seed_for,
    train_group,
)
from groundloop.search_index import SearchFold
from groundloop.settings import Settings
from groundloop.skeleton import Role, run_role

log = logging.getLogger(__name__)

CONSUMED = (GenerationAdvanced, RunCompleted, PatchFailed, SearchCompleted, SearchStopped)


@dataclass
class TrainerContext:
    """What one trainer process keeps between events: caches only, never decisions."""

    bus: Bus
    settings: Settings
    policies: dict[str, tuple[int, Policy]] = field(default_factory=dict)  # search -> (v, p)
    not_rl: set[str] = field(default_factory=set)  # searches whose strategy uses no policy
    logs: LogFollowers[FollowedState] = field(init=False)  # each search's log, read once

    def __post_init__(self) -> None:
        self.logs = LogFollowers(self.bus, FollowedState)

    async def read_state(self, search_id: str) -> RLState:
        """The search's state from its log as it is now, folding only what fits it
        (`search_index`): a forged result can neither reward an idea nor complete a group.
        A copy of the followed fold, which the handler advances with what it publishes."""
        return (await self.logs.to_end(search_id)).state.copy()

    def environment(self, name: str) -> Environment:
        return Environment.load(name, self.settings.environments_dir)

    async def policy(self, state: RLState, version: int) -> Policy:
        """Policy `version` of the search: the cached one, or loaded from its checkpoint."""
        cached = self.policies.get(state.search_id)
        if cached is not None and cached[0] == version:
            return cached[1]
        self.policies.pop(state.search_id, None)
        policy = await asyncio.to_thread(self._build, state)
        if version == 0:
            data = await self._initial_bytes(state, policy)
        else:
            update = state.updates[version - 1]
            assert update.checkpoint_key is not None
            data = await load_checkpoint(self.bus, update.checkpoint_key, update.checkpoint_digest)
        await asyncio.to_thread(policy.load_state_bytes, data)
        self.policies[state.search_id] = (version, policy)
        return policy

    def keep(self, search_id: str, version: int, policy: Policy) -> None:
        self.policies[search_id] = (version, policy)

    def forget(self, search_id: str) -> None:
        self.policies.pop(search_id, None)

    def _build(self, state: RLState) -> Policy:
        assert state.started is not None and state.started.rl is not None
        rl = state.started.rl
        env = self.environment(state.started.environment)
        from groundloop.llm.idea_parsing import parse_ideas
        from groundloop.rl_trainer.hf_policy import PolicyLoadError

        try:
            return build_policy(
                rl.policy,
                env.manifest,
                state.started.seed,
                parse_ideas=lambda text: [(i.title, i.text) for i in parse_ideas(text)],
                lora_rank=rl.lora_rank,
            )
        except (OSError, ValueError, PolicyLoadError) as exc:
            raise PolicyUnavailable(f"policy {rl.policy or 'knobs-lm'}: {exc}") from exc

    async def _initial_bytes(self, state: RLState, policy: Policy) -> bytes:
        """Version 0, warmed up once and stored, so restarts and replicas share its bytes."""
        key = initial_key(state.search_id)
        with contextlib.suppress(ObjectNotFoundError):
            return await self.bus.get_artifact(key)
        assert state.started is not None and state.started.rl is not None
        rl = state.started.rl
        examples = await self._warm_start_examples(state)
        seed = seed_for(state, "warm-up")
        context = SamplingContext(
            prompt_text=ideator_prompt(self.environment(state.started.environment)), past=[]
        )
        loss = await asyncio.to_thread(
            policy.warm_up, examples, rl.warmup_steps, seed, None, context
        )
        log.info(
            "search %s: initial policy warmed up (%d steps, %d examples%s, loss %.3f)",
            state.search_id,
            rl.warmup_steps,
            len(examples),
            f" from search {rl.warm_start_from}" if rl.warm_start_from else "",
            loss,
        )
        data = await asyncio.to_thread(policy.state_bytes)
        # A replica may have stored it meanwhile: take its bytes, so that every replica and
        # restart starts from the very same version 0 (the first stored wins).
        with contextlib.suppress(ObjectNotFoundError):
            return await self.bus.get_artifact(key)
        await self.bus.put_artifact(key, data)
        return data

    async def _warm_start_examples(self, state: RLState) -> list[tuple[str, float]]:
        """Reward-weighted examples from a recorded search (its ideas that ran, weighted by
        how their reward ranks between the worst and the best), or [] for the policy's own
        default warm-up."""
        assert state.started is not None and state.started.rl is not None
        source = state.started.rl.warm_start_from
        if not source:
            return []
        recorded = await self.read_state(source)
        if recorded.started is None:
            raise PolicyUnavailable(
                f"--rl-warm-start {source}: no such search in the log (see `groundloop searches`)"
            )
        scored = [
            (idea, recorded.rewards[idea.idea_id])
            for idea in recorded.ideas
            if idea.idea_id in recorded.rewards and idea.mode != "baseline"
        ]
        if not scored:
            raise PolicyUnavailable(f"--rl-warm-start {source}: the search has no idea with a run")
        low, high = min(r for _, r in scored), max(r for _, r in scored)
        span = (high - low) or 1.0
        return [
            (example_text(idea.text, idea.knobs), (reward - low) / span)
            for idea, reward in scored
            if reward > low or high == low
        ]


def example_text(text: str, knobs: dict[str, float | int | str] | None) -> str:
    """What a warm-start example says: the knob settings for a knob idea (the policy renders
    them in its own words), else the idea text."""
    if knobs is None:
        return text
    return " ; ".join(f"{name} = {value}" for name, value in knobs.items())


class FollowedState(SearchFold):
    """A search's `RLState` folded from the events that fit its log, as they are written;
    equal to `RLState.fold` of `fitting_events` of the log read so far."""

    def __init__(self, search_id: str):
        super().__init__(search_id)
        self.state = RLState(search_id)

    def fit(self, seq: int, event: Event) -> None:
        if event.search_id == self.search_id:
            self.state.apply(event)


async def on_event(event: Event, delivery: Delivery, ctx: TrainerContext) -> list[Event]:
    if event.search_id in ctx.not_rl:
        return []
    state = await ctx.read_state(event.search_id)
    if state.started is None:
        return []  # nothing to learn for a search that was never started
    if not state.uses_policy or state.started.rl is None:
        ctx.not_rl.add(event.search_id)
        return []
    try:
        async with delivery.heartbeat():
            await advance(state, ctx, event)
    except PolicyUnavailable as exc:
        log.error("%s: the search cannot go on: %s", describe(event), exc)
        return [stopped(state, event, str(exc))]
    return []


async def advance(state: RLState, ctx: TrainerContext, cause: Event) -> None:
    """Do every update that is due, then sample the group that is due, publishing as it goes.
    Each published event is folded into `state`, so the loop sees its own progress."""
    while True:
        group = state.due_update()
        if group is not None:
            update = await train_group(state, group, ctx, cause)
            published = await publish_event(ctx.bus, update)  # once per step
            if published.refused:  # another trainer published this step: take the log's
                log.warning(
                    "%s: step %d was published by another trainer", describe(cause), group.step
                )
                ctx.forget(state.search_id)
                state = await ctx.read_state(state.search_id)
            else:
                state.apply(update)
            continue
        group = state.due_sample()
        if group is None:
            return
        for idea in await sample_group(state, group, ctx, cause):
            await ctx.bus.publish(idea)
            state.apply(idea)
        if not state.due_update():
            return


def stopped(state: RLState, cause: Event, reason: str) -> SearchStopped:
    assert state.started is not None
    return SearchStopped(
        event_id=stable_id(PRODUCER, state.started.event_id, "stopped"),
        search_id=state.search_id,
        causation_id=cause.event_id,
        producer=PRODUCER,
        stage="rl-trainer",
        reason=reason,
        error_type="PolicyUnavailable",
    )


def role() -> Role[TrainerContext]:
    @contextlib.asynccontextmanager
    async def context(
        settings: Settings, bus: Bus, _stop: asyncio.Event
    ) -> AsyncIterator[TrainerContext]:
        yield TrainerContext(bus, settings)

    # One event at a time: a search's updates and samples must happen in log order.
    return Role(name=PRODUCER, consumes=CONSUMED, deps=context, handle=on_event)


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    await run_role(role(), settings, stop or asyncio.Event())


__all__ = ["RL_STRATEGIES", "TrainerContext", "advance", "on_event", "role", "run"]
