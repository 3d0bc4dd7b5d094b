"""A real search decides the same with garbage in its log as without it.

The same small evolution search (synthetic environment, knob ideator and implementer, every
service a task of this process talking through a real nats-server, runs as real sandboxed
subprocesses) runs twice, in two streams: once clean, once with garbage published on the
search's subjects after its baseline runs were requested and before any runner serves them
(so the forged generation lands ahead of the real one). Then: the decisions (generation
plans, run requests, the result), the ideas and their patches equal the clean run's; every
reader still works (`events tail`, `events dead-letters`, `replay rebuild`, re-decide); each
garbage entry is in the quarantine exactly once, and each role has at most one dead letter
per entry. `GARBAGE` is a table: a new kind is one more row.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.api.store import make_engine, table_snapshot
from groundloop.broker import NatsServer
from groundloop.bus import Bus
from groundloop.cli.history_commands import redecide_search
from groundloop.cli.search_job import run_services
from groundloop.execution.environment import Environment
from groundloop.permissions import Names
from groundloop.runner.service import run as run_runner
from groundloop.runner.slots import RunnerSettings
from groundloop.settings import Settings
from tests import factories
from tests.paths import REPO_ROOT
from tests.runner_support import settings_environment
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(240)

SEARCH = "garbage"
ROLES = ("evolver", "ideator", "implementer", "runner-cpu", "projector")


@dataclass(frozen=True)
class Scene:
    """What a row of GARBAGE builds its entry from."""

    prefix: str
    started: ev.SearchStarted
    real_idea: str  # an idea the search will propose (known from the clean run)

    def subject(self, kind: str, key: str, search: str = SEARCH) -> str:
        return f"{self.prefix}.{search}.{kind}.{key}"


@dataclass(frozen=True)
class Garbage:
    """One kind of garbage: `entry(scene)` -> (subject, body, sign with the operator's key);
    `reason`: a fragment of the reason it is refused with; `unreadable`: refused by the one
    reading of the log (`Bus.read`), not by the checks of what fits the log."""

    name: str
    entry: Callable[[Scene], tuple[str, bytes, bool]]
    reason: str
    unreadable: bool = False


def _event(scene: Scene, event: ev.Event, sign: bool = True) -> tuple[str, bytes, bool]:
    return event.subject(scene.prefix), ev.encode(event), sign


def _idea(scene: Scene, search: str = SEARCH) -> ev.IdeaProposed:
    return factories.idea_proposed(search, 90, idea_id="garbage-idea", knobs={"LR": 1.0})


def _generation(scene: Scene, producer: str) -> ev.GenerationAdvanced:
    plan = ev.GenerationPlan(fresh=1)  # not the evolver's plan: the search would change
    forged = factories.generation_advanced(scene.started, 0, plan)
    return forged.model_copy(update={"event_id": f"forged-{producer}", "producer": producer})


def _patch(scene: Scene) -> ev.PatchReady:
    patch = factories.patch_ready(factories.idea_proposed(SEARCH, 91, idea_id="never-proposed"))
    return patch.model_copy(update={"environment_digest": scene.started.environment_digest})


def _request(scene: Scene) -> ev.RunRequested:
    return ev.RunRequested(
        search_id=SEARCH, producer="ideator", run_id="run-by-ideator", purpose="baseline",
        generation=0, environment="synthetic",
        environment_digest=scene.started.environment_digest, seed=0,
    )  # fmt: skip


def _completed(scene: Scene) -> ev.RunCompleted:
    # A great score for a real idea: folded, it would make that idea the best.
    return factories.run_result(
        SEARCH, "run-never-requested", score=0.999, reward=0.999, idea_id=scene.real_idea
    )


def _shortfall(scene: Scene) -> ev.IdeasShortfall:
    return ev.IdeasShortfall(
        search_id=SEARCH, producer="evolver", generation=0, planned=3, proposed=1,
        reason="forged: would close generation 0 after one idea",
    )  # fmt: skip


def _future(scene: Scene) -> tuple[str, bytes, bool]:
    payload = json.loads(ev.encode(_idea(scene)))
    payload["version"] = 99
    return scene.subject("IdeaProposed", "future"), json.dumps(payload).encode(), True


def _oversized(scene: Scene) -> tuple[str, bytes, bool]:
    idea = _idea(scene).model_copy(update={"text": "x" * (1024 * 1024 + 10)})
    return scene.subject("IdeaProposed", "big"), ev.encode(idea), True


def _unknown(scene: Scene) -> tuple[str, bytes, bool]:
    payload = json.loads(ev.encode(_idea(scene)))
    payload["type"] = "IdeaWhispered"
    return scene.subject("IdeaWhispered", "x"), json.dumps(payload).encode(), True


GARBAGE = [
    Garbage("invalid JSON", lambda s: (s.subject("IdeaProposed", "j"), b"{not json", False),
            "not JSON", True),
    Garbage("not an object", lambda s: (s.subject("RunCompleted", "o"), b"[1, 2]", False),
            "expected a JSON object", True),
    Garbage("unknown type", _unknown, "unknown event type 'IdeaWhispered'", True),
    Garbage("future schema version", _future, "invalid IdeaProposed", True),
    Garbage("oversized payload", _oversized, "over the 1,048,576-byte limit", True),
    Garbage("wrong subject for its type",
            lambda s: (s.subject("IdeaProposed", "p"), ev.encode(_patch(s)), True),
            "a subject of IdeaProposed events", True),
    Garbage("wrong search in subject",
            lambda s: (s.subject("IdeaProposed", "w"), ev.encode(_idea(s, "other")), True),
            "a subject of search 'garbage'", True),
    Garbage("event of a search that does not exist", lambda s: _event(s, _idea(s, "ghost")),
            "'ghost', which has no SearchStarted"),
    Garbage("GenerationAdvanced by the ideator",
            lambda s: _event(s, _generation(s, "ideator")), "only the evolver writes it"),
    Garbage("unsigned GenerationAdvanced claiming the evolver",
            lambda s: _event(s, _generation(s, "evolver"), sign=False), "unsigned", True),
    Garbage("IdeasShortfall by the evolver", lambda s: _event(s, _shortfall(s)),
            "only the ideator writes it"),
    Garbage("PatchReady for an idea never proposed", lambda s: _event(s, _patch(s)),
            "never proposed"),
    Garbage("RunCompleted for a run never requested", lambda s: _event(s, _completed(s)),
            "never asked for"),
    Garbage("RunRequested by the ideator", lambda s: _event(s, _request(s)),
            "only the evolver asks for runs"),
]  # fmt: skip


@dataclass
class Outcome:
    log: list[ev.Event]  # the search's valid events, the garbage's left out
    garbage: dict[int, Garbage]  # stream seq -> the garbage stored there


def renamed(settings: Settings, tag: str) -> Settings:
    return settings.model_copy(
        update={
            "subject_prefix": f"{settings.subject_prefix}{tag.lower()}",
            "stream": f"{settings.stream}_{tag}",
            "dlq_stream": f"{settings.dlq_stream}_{tag}",
            "artifacts_bucket": f"{settings.artifacts_bucket}_{tag.lower()}",
            "data_dir": settings.data_dir / tag,
            "db_url": settings.db_url.replace(".db", f"_{tag}.db"),
        }
    )


async def publish_garbage(bus: Bus, scene: Scene) -> dict[int, Garbage]:
    stored: dict[int, Garbage] = {}
    for row in GARBAGE:
        subject, body, sign = row.entry(scene)
        headers = bus.signer.headers(subject, body) if sign and bus.signer else {}
        ack = await bus.js.publish(subject, body, headers=headers)
        stored[ack.seq] = row
    # A valid duplicate of an event in the log: the broker's dedupe stores nothing.
    again = await bus.publish(scene.started)
    assert again.duplicate, "a re-published event must be deduplicated, not stored again"
    return stored


async def search(settings: Settings, real_idea: str | None) -> Outcome:
    env = Environment.load("synthetic", settings.environments_dir)
    started = factories.search_started_in(
        env, SEARCH, generations=2, ideas_per_generation=3, final_top_k=2, final_seeds=2
    )
    bus = await Bus.connect(settings, "t")
    await bus.publish(started)
    stop_services, stop_runner = asyncio.Event(), asyncio.Event()
    tasks = await run_services(
        settings, stop_services, resource_class="cpu", slots=1, with_runner=False
    )
    garbage: dict[int, Garbage] = {}
    try:
        # No runner yet: the baseline runs are requested and nothing can follow them.
        await eventually(
            lambda: _count(bus, ev.RunRequested, 2), timeout=30, what="baseline run requests"
        )
        if real_idea is not None:
            garbage = await publish_garbage(bus, Scene(settings.subject_prefix, started, real_idea))
        runner = RunnerSettings(slots=1, runner_id="r")
        tasks.append(asyncio.create_task(run_runner(settings, runner, stop_runner)))
        await eventually(
            lambda: _count(bus, ev.SearchCompleted, 1), timeout=90, what="SearchCompleted"
        )
        # The live projector has seen everything once its last event is projected.
        await eventually(lambda: _projected(settings, bus), timeout=30, what="projection")
    finally:
        stop_runner.set()
        stop_services.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    log = [e async for seq, e in bus.raw_events(SEARCH) if seq not in garbage]
    await bus.close()
    return Outcome(log, garbage)


async def _count(bus: Bus, kind: type[ev.Event], n: int) -> bool:
    return len([e async for e in bus.events(SEARCH) if isinstance(e, kind)]) >= n


async def _projected(settings: Settings, bus: Bus) -> bool:
    last = (await bus.stream_state())["last_seq"]
    info = await bus.js.consumer_info(settings.stream, "projector")
    return info.delivered.stream_seq >= last and not info.num_ack_pending


def decisions(outcome: Outcome) -> dict[str, list]:
    """What the search decided and produced, without times (ids are deterministic)."""
    real, skip = outcome.log, {"occurred_at", "causation_id"}
    return {
        "evolver": [e.model_dump(mode="json", exclude=skip) for e in real if e.producer == "evolver"],
        "ideas": [
            (e.idea_id, e.generation, e.mode, e.title, e.knobs, e.parent_ids)
            for e in real if isinstance(e, ev.IdeaProposed)
        ],
        "patches": sorted(  # implemented concurrently: their order in the log varies
            (e.idea_id, e.patch_id, e.diff) for e in real if isinstance(e, ev.PatchReady)
        ),
        "runs": sorted(
            (e.run_id, e.status, e.score) for e in real if isinstance(e, ev.RunCompleted)
        ),
    }  # fmt: skip


def cli(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "groundloop.cli.main", *args],
        env={**settings_environment(settings), "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"groundloop {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


async def test_garbage_mid_search_changes_no_decision(
    settings: Settings, nats_server: NatsServer, tmp_path: Path
):
    settings = settings.model_copy(update={"environments_dir": REPO_ROOT / "environments"})
    clean = await search(settings, None)
    assert not [q async for q in _quarantined(settings)], "the clean run has no garbage"
    ideas = [e for e in clean.log if isinstance(e, ev.IdeaProposed)]
    assert len(ideas) == 6

    dirty_settings = renamed(settings, "G")
    nats_server.serve(Names.of(dirty_settings))
    dirty = await search(dirty_settings, ideas[0].idea_id)
    assert len(dirty.garbage) == len(GARBAGE)
    first_forged = min(
        seq for seq, row in dirty.garbage.items() if "GenerationAdvanced" in row.name
    )
    assert decisions(dirty) == decisions(clean)
    bus = await Bus.connect(dirty_settings, "t")
    try:
        # The real generation 0 was published after the forged ones, not blocked by them.
        real_gen0 = [
            seq async for seq, e in bus.raw_events(SEARCH)
            if isinstance(e, ev.GenerationAdvanced) and e.producer == "evolver"
            and not e.event_id.startswith("forged-")
        ]  # fmt: skip
        assert real_gen0 and real_gen0[0] > first_forged

        # Every garbage entry is quarantined exactly once, with its reason; nothing else is.
        quarantined = await bus.quarantined()
        counts = Counter(q.seq for q in quarantined)
        assert all(n == 1 for n in counts.values()), counts
        assert set(counts) == set(dirty.garbage), {
            dirty.garbage[s].name if s in dirty.garbage else s: 1
            for s in set(counts) ^ set(dirty.garbage)
        }
        for q in quarantined:
            row = dirty.garbage[q.seq]
            assert row.reason in q.reason, (row.name, q.reason)
        # Each role dead-letters an entry it received at most once.
        for role in ROLES:
            letters = Counter(
                int(h["Groundloop-Stream-Seq"]) for h, _ in await bus.dead_letters(role)
            )
            assert all(n == 1 for n in letters.values()), (role, letters)
            assert set(letters) <= set(dirty.garbage), (role, letters)
        assert await bus.dead_letters("projector"), "the projector receives every entry"
    finally:
        await bus.close()

    # Every reader still works on the log with garbage in it.
    tail = cli(dirty_settings, "events", "tail", "--search", SEARCH)
    assert tail.count(f"{SEARCH} SearchCompleted") == 1
    unreadable = [row for row in dirty.garbage.values() if row.unreadable]
    assert tail.count("quarantined seq") == len(unreadable), tail
    shown = cli(dirty_settings, "events", "dead-letters", "evolver")
    assert "not JSON" in shown and "only the evolver writes it" in shown
    live = table_snapshot(make_engine(dirty_settings.resolved_db_url()))
    cli(dirty_settings, "replay", "rebuild")
    assert table_snapshot(make_engine(dirty_settings.resolved_db_url())) == live
    report = await redecide_search(dirty_settings, SEARCH)  # `groundloop replay re-decide`
    assert report.ok, [d.describe() for d in report.differences]


async def _quarantined(settings: Settings):
    bus = await Bus.connect(settings, "t")
    try:
        for q in await bus.quarantined():
            yield q
    finally:
        await bus.close()
