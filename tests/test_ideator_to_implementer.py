"""The ideator's knob ideas through the implementer: in process on each environment (every
idea passes pre-flight), and both services over a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.execution.environment import Environment
from groundloop.ideator.history import SearchHistory
from groundloop.ideator.service import IdeatorDeps, propose
from groundloop.implementer.service import ImplementerDeps, handle
from groundloop.llm.client import ClientCache, LLMSettings
from tests.factories import generation_advanced, search_started_in
from tests.paths import ENVIRONMENTS


@pytest.fixture
def synthetic() -> Environment:
    return Environment.load("synthetic")


def started_for(env: Environment, search_id: str = "s1") -> ev.SearchStarted:
    return search_started_in(env, search_id, 1, generations=2, ideas_per_generation=4)


def make_deps(
    tmp: Path, env: Environment, started: ev.SearchStarted, **overrides
) -> ImplementerDeps:
    """Deps for knob ideas, which never call a model."""
    values = dict(
        search=lambda _s: started,
        environment=lambda _n: env,
        llm=ClientCache(LLMSettings()),
        work_dir=tmp / "work",
        cache_dir=tmp / "cache",
    )
    return ImplementerDeps(**{**values, **overrides})


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module, so an environment's prepare step runs once."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize(
    "name",
    [
        "synthetic",
        pytest.param("tinygpt", marks=pytest.mark.slow),
        pytest.param("tinygrpo", marks=pytest.mark.slow),
    ],
)
def test_knob_proposer_ideas_pass_preflight(tmp_path, shared_cache, name):
    if not (ENVIRONMENTS / name / "manifest.toml").is_file():
        pytest.skip(f"environment {name} does not exist yet")
    env = Environment.load(name)
    if not env.manifest.knobs:
        pytest.skip(f"environment {name} declares no knobs")
    started = started_for(env)
    history = SearchHistory.from_events("s1", [started])
    gen0 = ev.GenerationAdvanced(
        search_id="s1", producer="evolver", generation=0, plan=ev.GenerationPlan(fresh=2)
    )
    ideas = propose(
        gen0,
        IdeatorDeps(history=history, environment=lambda _n: env, llm=ClientCache(LLMSettings())),
    ).events
    assert len(ideas) == 2
    for idea in ideas:
        [patch] = handle(idea, make_deps(tmp_path, env, started, cache_dir=shared_cache))
        assert isinstance(patch, ev.PatchReady), patch.last_error
        assert patch.preflight.passed and patch.files_changed
        assert next(c for c in patch.preflight.checks if c.name == "smoke").ok


# ---------------------------------------------------------------------------- over NATS


async def test_ideator_and_implementer_services_over_nats(settings, synthetic):
    from groundloop.bus import Bus
    from groundloop.ideator.service import run as run_ideator
    from groundloop.implementer.service import run as run_implementer

    bus = await Bus.connect(settings, "test")
    outcomes: asyncio.Queue[ev.Event] = asyncio.Queue()

    async def on_message(msg) -> None:
        event = ev.decode(msg.data)
        if isinstance(event, ev.PatchReady | ev.PatchFailed):
            await outcomes.put(event)

    watch = await bus.nc.subscribe(bus.subject_filter(search_id="nats1"), cb=on_message)
    stop = asyncio.Event()
    services = [
        asyncio.create_task(run_ideator(settings, stop)),
        asyncio.create_task(run_implementer(settings, stop, work_dir=settings.data_dir / "impl")),
    ]
    try:
        started = started_for(synthetic, search_id="nats1")
        await bus.publish(started)
        gen = generation_advanced(started, 0, ev.GenerationPlan(fresh=3))
        await bus.publish(gen, once_per_subject=True)
        patches = [await asyncio.wait_for(outcomes.get(), timeout=60) for _ in range(3)]
        ideas = [e async for e in bus.events("nats1") if isinstance(e, ev.IdeaProposed)]
        assert len(ideas) == 3 and all(i.proposer.kind == "knobs" for i in ideas)
        assert all(isinstance(p, ev.PatchReady) and p.preflight.passed for p in patches)
        assert {p.idea_id for p in patches} == {i.idea_id for i in ideas}
    finally:
        stop.set()
        await watch.unsubscribe()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*services), timeout=20)
        await bus.close()
