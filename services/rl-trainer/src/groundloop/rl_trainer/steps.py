"""The two things the trainer does with a group: sample it, and train on it.

`sample_group` draws the group's ideas from the step's policy version with a seed that is a
function of the search and the step, stores the exact samples, and returns the IdeaProposed
events (ids from the generation and the slot). `train_group` computes the rewards the update
sees (the runs' rewards, plus the anti-collapse bonuses when configured), runs one GRPO step,
stores the checkpoint and returns the PolicyUpdated that publishes it, with the group's
measures: mean and max reward, distinct-idea fraction, pairwise similarity, valid fraction,
completion length, KL and loss, and whether the ideas have collapsed.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import TYPE_CHECKING

from nats.js.errors import ObjectNotFoundError

from groundloop.events import (
    Event,
    IdeaProposed,
    PolicyUpdated,
    ProposerInfo,
    RLSettings,
    stable_id,
)
from groundloop.execution.environment import Environment
from groundloop.llm.idea_prompts import build_prompt
from groundloop.rl_trainer.checkpoints import decode_group, encode_group, group_key, put_checkpoint
from groundloop.rl_trainer.diversity import (
    collapsed,
    distinct_fraction,
    mean_pairwise_similarity,
    shaped_rewards,
)
from groundloop.rl_trainer.policy import GRPOSettings, SamplingContext
from groundloop.rl_trainer.state import PRODUCER, Group, RLState

if TYPE_CHECKING:
    from groundloop.rl_trainer.service import TrainerContext

TITLE_CHARS = 120


class PolicyUnavailable(Exception):
    """The search's policy cannot be built or loaded as configured (a model path that is not
    there, an environment without knobs for the offline policy): the search stops, saying why."""


def seed_for(state: RLState, *what: object) -> int:
    """A seed from the search's seed and what it is for, not from the search id: like the
    evolver's plans, two searches with the same seed start from the same policy and draw
    the same first group, so variants (plain vs novelty bonus) compare paired."""
    assert state.started is not None
    text = "/".join(str(p) for p in ("groundloop-rl", state.started.seed, *what))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def ideator_prompt(env: Environment) -> str:
    """The paper's ideator prompt, asking for one fresh idea."""
    return build_prompt(
        environment=env.describe_for_prompt(),
        metric=env.manifest.metric,
        mode="fresh",
        count=1,
        context=[],
        baseline_score=None,
        written_this_generation=[],
    )


def sampling_context(state: RLState, group: Group, env: Environment) -> SamplingContext:
    """The prompt, and the past trajectories when asked."""
    assert state.started is not None and state.started.rl is not None
    past = state.past_trajectories(group.generation, state.started.rl.past_in_context)
    return SamplingContext(prompt_text=ideator_prompt(env), past=past)


def grpo_settings(rl: RLSettings) -> GRPOSettings:
    """The same settings for sampling and for the update (temperature enters both, so the
    importance ratios compare like with like)."""
    return GRPOSettings(
        learning_rate=rl.learning_rate,
        kl_coef=rl.kl_coef,
        clip_eps=rl.clip_eps,
        inner_steps=rl.inner_steps,
        max_new_tokens=rl.max_new_tokens,
        temperature=rl.temperature,
    )


async def sample_group(
    state: RLState, group: Group, ctx: TrainerContext, cause: Event
) -> list[IdeaProposed]:
    """The group's ideas not yet in the log. Samples already stored (by a trainer that died
    while publishing them) are reused, so the log and the training data always agree."""
    assert state.started is not None and state.started.rl is not None
    policy = await ctx.policy(state, group.step)
    env = ctx.environment(state.started.environment)
    context = sampling_context(state, group, env)
    key = group_key(state.search_id, group.step)
    try:
        completions = decode_group(await ctx.bus.get_artifact(key))
    except ObjectNotFoundError:
        seed = seed_for(state, "sample", group.step)
        settings = grpo_settings(state.started.rl)
        completions = await asyncio.to_thread(policy.sample, context, group.size, seed, settings)
        await ctx.bus.put_artifact(key, encode_group(completions))
    digest = hashlib.sha256(context.prompt_text.encode()).hexdigest()
    info = ProposerInfo(kind="rl", model=policy.model_name, policy_version=group.step)
    out: list[IdeaProposed] = []
    for index, completion in enumerate(completions):
        idea_id = group.idea_id(state.search_id, index)
        if idea_id in group.ideas:
            continue
        draft = policy.to_idea(completion)
        text = draft.text if draft.valid else f"{draft.text}\n\n(unparsable: {draft.problem})"
        out.append(
            group.opened.derive(
                IdeaProposed,
                PRODUCER,
                group.first_slot + index,
                idea_id=idea_id,
                generation=group.generation,
                mode="rl",
                title=(draft.title or "policy sample")[:TITLE_CHARS],
                text=text or "(empty completion)",
                proposer=info,
                prompt_digest=digest,
                knobs=draft.knobs if draft.valid else None,
            )
        )
    return out


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


async def train_group(
    state: RLState, group: Group, ctx: TrainerContext, cause: Event
) -> PolicyUpdated:
    """One GRPO step on `group`; the checkpoint is stored before the event is returned."""
    assert state.started is not None and state.started.rl is not None
    rl, search_id = state.started.rl, state.search_id
    policy = await ctx.policy(state, group.step)
    ctx.forget(search_id)  # updated in place: not version `step` any more, and not yet published
    completions = decode_group(await ctx.bus.get_artifact(group_key(search_id, group.step)))
    ideas = [group.ideas.get(group.idea_id(search_id, i)) for i in range(len(completions))]
    texts = [idea.text if idea else c.text for idea, c in zip(ideas, completions, strict=True)]
    rewards = group.reward_list(search_id)[: len(completions)]
    lengths = [len(c.completion_ids) for c in completions]
    shaped = shaped_rewards(
        rewards,
        texts,
        state.earlier_texts(group.generation),
        rl.novelty_bonus,
        rl.length_bonus,
        rl.length_cap,
        lengths,
    )
    settings = grpo_settings(rl)
    env = ctx.environment(state.started.environment)
    context = sampling_context(state, group, env)
    stats = await asyncio.to_thread(policy.update, completions, shaped, settings, context)
    data = await asyncio.to_thread(policy.state_bytes)
    key, sha = await put_checkpoint(ctx.bus, search_id, group.step + 1, data)
    ctx.keep(search_id, group.step + 1, policy)
    distinct = distinct_fraction(texts)
    similarity = mean_pairwise_similarity(texts)
    valid = [policy.to_idea(c).valid for c in completions]
    return PolicyUpdated(
        event_id=stable_id(PRODUCER, state.started.event_id, "policy", group.step),
        search_id=search_id,
        causation_id=cause.event_id,
        producer=PRODUCER,
        policy_version=group.step + 1,
        step=group.step,
        generation=group.generation,
        checkpoint_key=key,
        checkpoint_digest=sha,
        mean_reward=sum(rewards) / len(rewards) if rewards else 0.0,
        max_reward=max(rewards, default=0.0),
        diversity=1.0 - similarity,
        kl=_finite(stats.kl),
        loss=_finite(stats.loss),
        group_size=len(completions),
        rewards=rewards,
        shaped_mean_reward=sum(shaped) / len(shaped) if shaped else None,
        distinct_fraction=distinct,
        mean_similarity=similarity,
        valid_fraction=sum(valid) / len(valid) if valid else None,
        mean_completion_tokens=_finite(stats.mean_completion_tokens),
        collapsed=collapsed(
            [*state.distinct_history(), distinct], rl.collapse_threshold, rl.collapse_steps
        ),
    )
