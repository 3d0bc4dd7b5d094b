"""Valid events that do not fit their search's log are refused before any role acts on them:
the real runner and implementer against a real nats-server and the synthetic environment;
replay rebuild leaves them out of the tables. Each is quarantined once, with its reason, and
dead-lettered once by each role it reached."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.api.projector import project_all
from groundloop.api.rebuild import rebuild
from groundloop.api.store import create_tables, make_engine, table_snapshot
from groundloop.bus import Bus
from groundloop.execution.environment import Environment
from groundloop.implementer.service import run as run_implementer
from groundloop.settings import Settings
from tests import factories
from tests.runner_support import Collector, make_environments, patch_event, serving
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(120)


def misfits(env: Environment, real: str) -> list[tuple[ev.Event, str]]:
    """(event, reason fragment): valid events that do not fit search `real`'s log."""
    ghost_patch = patch_event(env, "ghost", 0)
    unproposed = patch_event(env, real, 7)  # idea 7 of `real` was never proposed
    request = ev.RunRequested(
        event_id="req-by-ideator", search_id=real, producer="ideator", run_id="r-x",
        purpose="baseline", generation=0, environment=env.name,
        environment_digest=env.digest(), seed=0,
    )  # fmt: skip
    unready = request.model_copy(
        update={"event_id": "req-unready", "producer": "evolver", "run_id": "r-y",
                "purpose": "reeval", "patch_id": "never-ready"}
    )  # fmt: skip
    return [
        (ghost_patch, "'ghost', which has no SearchStarted"),
        (unproposed, "never proposed"),
        (request, "only the evolver asks for runs"),
        (unready, "patch never-ready, never ready"),
    ]


async def test_the_runner_runs_only_what_fits_its_search(settings: Settings, tmp_path: Path):
    envs = make_environments(tmp_path / "envs", wall=60)
    settings = settings.model_copy(update={"environments_dir": envs})
    env = Environment.load("synthetic", envs)
    bus = await Bus.connect(settings, "t")
    real = "real"
    fitting = patch_event(env, real, 0)
    bad = misfits(env, real)
    seen = await Collector().start(bus, real)
    ghosts = await Collector().start(bus, "ghost")
    # The fitting patch's SearchStarted and idea come before it; garbage sits around it.
    refused: dict[int, str] = {}
    early = patch_event(env, real, 1)  # published before its search started: never fits
    refused[(await bus.publish(early)).seq] = "which has no SearchStarted"
    await bus.publish(factories.search_started_in(env, real))
    idea_of = {"idea_id": fitting.idea_id, "knobs": {"SLEEP_SECONDS": 0.0}}
    await bus.publish(factories.idea_proposed(real, 0, **idea_of))
    for event, reason in bad:
        refused[(await bus.publish(event)).seq] = reason
    await bus.publish(fitting)
    async with serving(settings, slots=1, runner_id="r1"):
        await seen.wait(lambda c: c.of(ev.RunCompleted))
        letters = await eventually(
            lambda: _exactly(bus.dead_letters("runner-cpu"), len(refused)),
            timeout=30,
            what="the runner's dead letters",
        )
    (done,) = seen.of(ev.RunCompleted)
    assert done.patch_id == fitting.patch_id and done.status == "succeeded"
    assert len(seen.of(ev.RunStarted)) == 1
    assert not ghosts.of(ev.RunStarted) and not ghosts.of(ev.RunCompleted)
    assert sorted(int(h["Groundloop-Stream-Seq"]) for h, _ in letters) == sorted(refused)
    for headers, _ in letters:
        assert refused[int(headers["Groundloop-Stream-Seq"])] in headers["Groundloop-Reason"]
        assert headers["Groundloop-Role"] == "runner-cpu"
    quarantined = {q.seq: q.reason for q in await bus.quarantined()}
    assert sorted(quarantined) == sorted(refused)
    assert all(refused[s] in why for s, why in quarantined.items()), quarantined

    # Replay rebuild: the tables of the fitting events alone (no orphan search, idea or run).
    await rebuild(settings)
    valid = [e async for e in bus.events()]
    expected = make_engine(f"sqlite:///{tmp_path / 'expected.db'}")
    create_tables(expected)
    project_all(expected, [e for e in valid if e.event_id not in _ids(bad, early)])
    assert table_snapshot(make_engine(settings.resolved_db_url())) == table_snapshot(expected)
    await bus.close()


async def test_the_implementer_refuses_ideas_of_a_search_never_started(settings: Settings):
    bus = await Bus.connect(settings, "t")
    refused: dict[int, str] = {}
    ghost = factories.idea_proposed("ghost", 0, knobs={"SLEEP_SECONDS": 0.0})
    refused[(await bus.publish(ghost)).seq] = "'ghost', which has no SearchStarted"
    # An idea stored before its search's SearchStarted never fits, whenever it is read.
    early = factories.idea_proposed("late", 0, knobs={"SLEEP_SECONDS": 0.0})
    refused[(await bus.publish(early)).seq] = "'late', which has no SearchStarted"
    await bus.publish(factories.search_started("late"))
    stop = asyncio.Event()
    task = asyncio.create_task(run_implementer(settings, stop, concurrency=1))
    try:
        letters = await eventually(
            lambda: _exactly(bus.dead_letters("implementer"), len(refused)),
            timeout=30,
            what="the implementer's dead letters",
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    for headers, _ in letters:
        assert refused[int(headers["Groundloop-Stream-Seq"])] in headers["Groundloop-Reason"]
    assert not [e async for e in bus.events() if isinstance(e, ev.PatchReady | ev.PatchFailed)]
    assert sorted(q.seq for q in await bus.quarantined()) == sorted(refused)
    await bus.close()


def _ids(bad: list[tuple[ev.Event, str]], *more: ev.Event) -> set[str]:
    return {e.event_id for e, _ in bad} | {e.event_id for e in more}


async def _exactly(letters_coro, count: int):
    letters = await letters_coro
    assert len(letters) <= count, [h.get("Groundloop-Reason") for h, _ in letters]
    return letters if len(letters) == count else None
