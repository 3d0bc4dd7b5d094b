"""The soak's short variant, for CI (the full one, `benchmarks/soak.py`, runs for ten minutes
and prints its figures): the same code, on the module's nats-server.

Every role runs as a separate process (`python -m groundloop.<role>`: evolver, ideator,
implementer, projector, 2 runner replicas of 2 slots); 10 searches run at once, each one that
completes replaced by a new one for 20 s and until 20 have started. Every search must complete; no idea,
patch or run may be lost or handled twice, no event id stored twice; nothing dead-lettered or
quarantined; the projector must have projected every event; every service process must still
be alive. No timing is asserted, and memory only with a bound no leak-free process nears.
The checks themselves are shown to catch a lost run, a patch made twice and an event stored
twice on a simulated search's log.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.pipeline import copy_environment
from benchmarks.soak import SoakOptions, show, soak
from groundloop import events as ev
from groundloop.broker import NatsServer
from tests.evolver_world import SEARCH, World
from tests.evolver_world import search_started as world_search
from tests.fleet import exactly_once_failures, settings_for

pytestmark = pytest.mark.timeout(240)

OPTIONS = SoakOptions(
    searches=10,
    load_s=20.0,
    min_searches=20,
    runners=2,
    slots=2,
    run_seconds=0.2,
    generations=2,
    ideas=2,
    sample_s=1.0,
    stall_s=120.0,
)


async def test_many_searches_at_once_lose_nothing_and_repeat_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    envs = copy_environment(tmp_path, OPTIONS.run_seconds)
    settings = settings_for(nats_server, tmp_path, "SOAK", environments_dir=envs)
    result = await soak(settings, OPTIONS, tmp_path / "logs", nats_server.pid)
    show(result)
    assert not result["failures"], "\n".join(result["failures"])
    assert result["searches_started"] >= OPTIONS.min_searches
    assert result["searches_completed"] == result["searches_started"]
    # Every process was sampled: each service process (named role-slot-incarnation) and the broker.
    sampled = sorted(name.rsplit("-", 2)[0] for name in result["rss_kb"] if name != "nats-server")
    assert sampled == ["evolver", "ideator", "implementer", "projector", "runner", "runner"]
    assert "nats-server" in result["rss_kb"]
    for name, memory in result["rss_kb"].items():
        # Far above what the soak's own load adds to a warmed process (a few per cent).
        assert memory["end"] < 3 * memory["start"], f"{name}'s memory grew: {memory}"


def test_the_checks_find_a_lost_run_a_patch_made_twice_and_an_event_stored_twice():
    log = World().run(world_search(generations=2, ideas_per_generation=3)).log
    assert exactly_once_failures(log, {SEARCH}) == []

    run = next(e for e in log if isinstance(e, ev.RunCompleted) and e.purpose == "search")
    [lost] = exactly_once_failures([e for e in log if e is not run], {SEARCH})
    assert lost == f"{SEARCH}: patches run: lost [{run.patch_id!r}], more than once or unasked []"

    patch = next(e for e in log if isinstance(e, ev.PatchReady))
    again = patch.model_copy(update={"event_id": "another", "patch_id": "another"})
    found = exactly_once_failures([*log, again], {SEARCH})
    assert (
        f"{SEARCH}: ideas implemented: lost [], more than once or unasked [{patch.idea_id!r}]"
        in found
    )

    found = exactly_once_failures([*log, run], {SEARCH})
    assert f"event ids stored twice (1): [{run.event_id!r}]" in found
    assert f"{SEARCH}: runs completed twice: [{run.run_id!r}]" in found
