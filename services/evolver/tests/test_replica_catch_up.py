"""An evolver replica decides on the whole log up to its trigger, whatever it was delivered.

Replicas share the durable consumer, so each is delivered only some of a search's events;
before deciding, a replica folds every entry it was not delivered. These tests play one
replica on a real nats-server and publish the other replica's share of the events without
delivering them, so every decision must come from the catch-up.
"""

from __future__ import annotations

import random

import pytest

from groundloop.bus import Bus
from groundloop.consumer import Delivery
from groundloop.events import (
    Event,
    GenerationAdvanced,
    IdeaProposed,
    RunCompleted,
    RunRequested,
)
from groundloop.evolver.service import Deps, EvolverLoop, decide
from groundloop.evolver.state import SearchState
from groundloop.settings import Settings
from tests.evolver_world import SEARCH, World, manifest, search_started


def replica(bus: Bus) -> EvolverLoop:
    return EvolverLoop(bus, Deps(environments=lambda name: manifest()))


async def deliver(loop: EvolverLoop, event: Event, seq: int) -> None:
    """Hand `event`, stored at `seq`, to the replica as its consumer would."""
    await loop.on_event(event, Delivery(event, 1, 5, 2.0, seq=seq))


async def log_of(bus: Bus) -> list[Event]:
    return [event async for event in bus.events(SEARCH)]


async def test_an_event_landing_right_after_a_tick_is_folded_by_the_replica_not_given_it(
    settings: Settings,
):
    """The deadline tick folds the log up to its end; the entry written just after that end
    went to the other replica. The next delivered event must still see it, or the replica
    never sees its generation complete (and the search waits for the deadline)."""
    bus = await Bus.connect(settings, "test")
    try:
        loop = replica(bus)
        await bus.publish(search_started(generations=2, ideas_per_generation=2, baseline_seeds=2))
        await loop.rebuild()  # folds SearchStarted and requests the two baseline runs
        requests = [e for e in await log_of(bus) if isinstance(e, RunRequested)]
        assert len(requests) == 2
        await loop.tick_once()  # folds the log up to its current end
        world = World()
        first, second = (world.react(request)[0] for request in requests)
        await bus.publish(first)  # the other replica's share: never delivered here
        await deliver(loop, second, (await bus.publish(second)).seq)
        state = loop.deps.states[SEARCH]
        assert {run.status for run in state.runs.values()} == {"succeeded"}
        opened = [e.generation for e in await log_of(bus) if isinstance(e, GenerationAdvanced)]
        assert opened == [0], "the baseline is complete: generation 0 opens at once"
    finally:
        await bus.close()


@pytest.mark.parametrize("batch_gap", [EvolverLoop.BATCH_GAP, 1])
async def test_two_replicas_given_random_shares_decide_what_one_decides_alone(
    settings: Settings, batch_gap: int
):
    """A whole search played on the bus by two replicas, each delivered a random share of the
    events (and ticking at random moments): the replica delivered an event folds the log up
    to it, and the decisions equal those of one replica given every event. With
    `batch_gap=1` every gap is read in one batch rather than entry by entry."""
    bus = await Bus.connect(settings, "test")
    try:
        replicas, rng = [replica(bus), replica(bus)], random.Random(15)
        for loop in replicas:
            loop.BATCH_GAP = batch_gap
        started = search_started(generations=3, ideas_per_generation=3, final_seeds=2)
        await bus.publish(started)
        for loop in replicas:
            await loop.rebuild()
        world, reacted = World(), 0
        log = await log_of(bus)
        while reacted < len(log):  # the other services answer each entry in log order
            for reaction in world.react(log[reacted]):
                if rng.random() < 0.3:
                    await rng.choice(replicas).tick_once()
                loop = rng.choice(replicas)
                await deliver(loop, reaction, (await bus.publish(reaction)).seq)
                log = await log_of(bus)
                folded = SearchState.fold(log)
                if folded.ended:  # the replica keeps nothing of an ended search
                    assert SEARCH in loop.deps.ended and SEARCH not in loop.deps.states
                else:
                    assert loop.deps.states[SEARCH] == folded
            reacted += 1
            log = await log_of(bus)
            assert reacted < 500, "the search does not converge"
        log = await log_of(bus)
        # One replica given every event in log order decides the same, event for event.
        alone = World()
        alone.run(started)
        assert _decisions(log) == _decisions(alone.log)
        assert len({e.event_id for e in log}) == len(log)
    finally:
        await bus.close()


def _decisions(log: list[Event]) -> list[tuple]:
    """The evolver's decisions, without times and causes (which trigger came first)."""
    out: list[tuple] = []
    for e in log:
        if isinstance(e, GenerationAdvanced):
            out.append(("advance", e.generation, e.plan.model_dump_json()))
        elif isinstance(e, RunRequested):
            out.append(("run", e.run_id, e.purpose, e.seed))
        elif isinstance(e, RunCompleted) or e.producer != "evolver":
            continue
        else:
            out.append((e.TYPE, e.model_dump_json(exclude={"occurred_at", "causation_id"})))
    return sorted(out, key=str)


def test_how_two_proposers_ideas_interleave_in_the_log_changes_no_plan():
    """A hybrid generation is written by the ideator and the policy at once, so their ideas
    interleave in the log as timing has it (each proposer's own in the order it wrote them);
    the next generation's plan (Algorithm 1 samples its context in proposal order) must not
    depend on that."""
    world = World()
    world.run(search_started(generations=3, ideas_per_generation=6, baseline_seeds=1))
    first, second = world.generations()[:2]
    prefix = world.log[: world.log.index(second)]  # up to generation 1's go-ahead
    ideas = [e for e in prefix if isinstance(e, IdeaProposed)]
    # Every other idea of generation 0 becomes the policy's.
    ideator = ideas[0::2]
    policy = [i.model_copy(update={"mode": "rl"}) for i in ideas[1::2]]
    rest = [e for e in prefix if not isinstance(e, IdeaProposed)]
    at = rest.index(first) + 1
    plans = []
    for written in (ideator + policy, policy + ideator, [*policy[:1], *ideator, *policy[1:]]):
        state = SearchState.fold([*rest[:at], *written, *rest[at:]])
        (advanced,) = decide(state, Deps(environments=lambda name: manifest()), cause=None)
        assert isinstance(advanced, GenerationAdvanced) and advanced.generation == 1
        plans.append(advanced.plan)
    assert plans[0] == plans[1] == plans[2]
    assert plans[0].exploit_context_ids, "the plan samples a context"
