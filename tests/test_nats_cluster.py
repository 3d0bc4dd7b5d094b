"""The event log on a 3-node JetStream cluster (R3): a search survives a node's death.

Three real nats-servers on loopback (`groundloop.broker.NatsCluster`, the production
permission map and every role's own nkey), the real CLI as a subprocess with `--no-runner`,
and two real `python -m groundloop.runner` processes, each preferring a different node. Mid
search the node leading the log stream (and serving one runner) is SIGKILLed; the search
must complete with every idea implemented once, every patch run once and no event stored
twice, and the node, restarted, must catch up so that the log is on three current replicas
again.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
from nats.errors import TimeoutError as NatsTimeout

from groundloop import events as ev
from groundloop.broker import BrokerError, find_nats_server
from groundloop.broker_cluster import NatsCluster
from groundloop.bus import BrokerUnavailable, Bus
from groundloop.permissions import Names
from groundloop.settings import Settings
from tests.factories import search_started
from tests.fleet import Fleet, settings_for
from tests.paths import ENVIRONMENTS
from tests.waiting import eventually


def _have_nats_server() -> bool:
    try:
        find_nats_server()
    except BrokerError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _have_nats_server(), reason="no nats-server binary")

GENERATIONS, IDEAS = 2, 3


def cluster_settings(cluster: NatsCluster, root: Path, tag: str, **extra: object) -> Settings:
    """Settings on `cluster` with names of their own, every store kept on 3 replicas."""
    return settings_for(
        cluster, root, f"CL_{tag}", ack_wait_s=2.0, **{"stream_replicas": 3, **extra}
    )


def start_cluster(root: Path) -> NatsCluster:
    return NatsCluster(root / "cluster", 3, credentials=root / "credentials").start()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A healthy cluster for the tests that kill nothing."""
    started = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield started
    started.stop()


def streams_of(settings: Settings) -> list[str]:
    names = Names.of(settings)
    return [
        settings.stream,
        settings.dlq_stream,
        names.quarantine_stream,
        f"KV_{names.processed_bucket}",
        f"OBJ_{settings.artifacts_bucket}",
    ]


def connections_on(cluster: NatsCluster, i: int) -> set[str]:
    try:
        return {c.get("name", "") for c in cluster.monitor(i, "connz").get("connections") or []}
    except OSError:
        return set()


async def stream_leader(bus: Bus, stream: str) -> str | None:
    try:
        info = await bus.js.stream_info(stream)
    except Exception:  # noqa: BLE001 - no leader yet (timeout, "unavailable"): ask again
        return None
    return info.cluster.leader if info.cluster else None


async def replicated_and_current(bus: Bus, stream: str, size: int) -> bool:
    """Whether `stream` has a leader and `size - 1` other replicas, all current and online."""
    try:
        info = await bus.js.stream_info(stream)
    except Exception:  # noqa: BLE001 - mid-election
        return False
    cluster = info.cluster
    peers = (cluster.replicas or []) if cluster else []
    return bool(
        cluster
        and cluster.leader
        and info.config.num_replicas == size
        and len(peers) == size - 1
        and all(p.current and not p.offline for p in peers)
    )


def slow_synthetic(root: Path) -> Path:
    """A copy of the synthetic environment whose runs take ~0.4 s longer (so runs are in
    flight when the node dies; a different environment, with its own digest)."""
    envs = root / "envs"
    shutil.copytree(
        ENVIRONMENTS / "synthetic", envs / "synthetic", ignore=shutil.ignore_patterns("__pycache__")
    )
    config = envs / "synthetic" / "config.py"
    config.write_text(config.read_text().replace("SLEEP_SECONDS = 0.0", "SLEEP_SECONDS = 0.4"))
    return envs


def of(events: list[ev.Event], cls: type[ev.Event]) -> list:
    return [e for e in events if isinstance(e, cls)]


async def test_a_search_survives_the_stream_leaders_node_being_killed(tmp_path: Path) -> None:
    began = time.monotonic()
    cluster = start_cluster(tmp_path)
    settings = cluster_settings(
        cluster, tmp_path, "FAILOVER", environments_dir=slow_synthetic(tmp_path)
    )
    search_args = ["search", "--env", "synthetic", "--search-id", "failover"]
    search_args += ["--generations", str(GENERATIONS), "--ideas", str(IDEAS)]
    search_args += ["--final-seeds", "1", "--no-runner", "--no-ui"]
    commands = {
        "runner": ["-m", "groundloop.runner", "--slots", "1"],
        "cli": ["-m", "groundloop.cli.main", *search_args],
    }
    fleet = Fleet(settings, tmp_path / "logs", commands)
    bus = await Bus.connect(settings, "t")  # the operator creates the R3 streams
    try:
        leader = await eventually(
            lambda: stream_leader(bus, settings.stream), timeout=10, what="a stream leader"
        )
        nodes = [n.server_name for n in cluster.nodes]
        doomed = nodes.index(leader)  # the node to kill: the log's leader ...
        second, third = [i for i in range(3) if i != doomed]
        urls = cluster.urls

        def preferring(order: list[int]) -> str:
            """The nodes' URLs in the order a client tries them (first: preferred)."""
            return ",".join(urls[i] for i in order)

        # ... and runner a's preferred node; runner b prefers another, the CLI the third
        preferences = {"a": [doomed, second, third], "b": [second, third, doomed]}
        for slot, (runner_id, order) in enumerate(preferences.items()):
            data = tmp_path / f"runner-{runner_id}"
            fleet.start(
                "runner",
                slot,
                args=["--runner-id", runner_id],
                overrides={"nats_url": preferring(order), "data_dir": data},
            )
        await eventually(
            lambda: (
                "runner-a" in connections_on(cluster, doomed)
                and "runner-b" in connections_on(cluster, second)
            ),
            timeout=30,
            what="runner a connected to the leader's node and runner b to another",
        )
        cli = fleet.start("cli", overrides={"nats_url": preferring([third, doomed, second])})

        async def two_search_runs_completed() -> list[ev.Event] | None:
            assert cli.poll() is None, fleet.log_of("cli").read_text()[-3000:]
            try:
                log = [e async for e in bus.events("failover")]
            except Exception:  # noqa: BLE001 - a read cut short: look again
                return None
            searched = [r for r in of(log, ev.RunCompleted) if r.purpose == "search"]
            return log if len(searched) >= 2 else None

        before = await eventually(
            two_search_runs_completed, timeout=60, what="2 search runs", interval=0.1
        )
        stored_before = (await bus.stream_state())["last_seq"]
        cluster.kill(doomed)
        killed_at = time.monotonic()
        # Asking with a short timeout: a question lost with the dead node would otherwise
        # hold the measurement for the API's 10 s.
        quick = bus.nc.jetstream(timeout=0.5)

        async def stored_after_kill() -> bool:
            try:
                return (await quick.stream_info(settings.stream)).state.last_seq > stored_before
            except Exception:  # noqa: BLE001 - no stream leader yet
                return False

        await eventually(
            stored_after_kill, timeout=30, what="an event stored after the kill", interval=0.02
        )
        stalled_s = time.monotonic() - killed_at
        new_leader = await eventually(
            lambda: stream_leader(bus, settings.stream), timeout=30, what="a new stream leader"
        )
        assert new_leader != leader
        await eventually(
            lambda: "runner-a" in connections_on(cluster, second) | connections_on(cluster, third),
            timeout=30,
            what="runner a failing over to a surviving node",
        )

        await eventually(lambda: cli.poll() is not None, timeout=90, what="the search to end")
        assert cli.returncode == 0, fleet.log_of("cli").read_text()[-4000:]
        search_s = time.monotonic() - began

        log = [e async for e in bus.events("failover")]
        ids = [seq_event[1].event_id async for seq_event in bus.raw_events()]
        assert len(ids) == len(set(ids)), "an event id is stored twice in the log"
        assert (await bus.stream_state())["messages"] == len(ids), "an entry is not an event"

        ideas = of(log, ev.IdeaProposed)
        assert len(ideas) == GENERATIONS * IDEAS
        outcomes = Counter(e.idea_id for e in of(log, ev.PatchReady) + of(log, ev.PatchFailed))
        assert outcomes == Counter(i.idea_id for i in ideas), "an idea lost or implemented twice"
        patches = {p.patch_id for p in of(log, ev.PatchReady)}
        searched = Counter(r.patch_id for r in of(log, ev.RunCompleted) if r.purpose == "search")
        assert searched == Counter(patches), "a patch's run lost or completed twice"
        completed = Counter(r.run_id for r in of(log, ev.RunCompleted))
        assert max(completed.values()) == 1, "a run completed twice"
        requested = {r.run_id for r in of(log, ev.RunRequested)}
        assert requested <= set(completed), "a requested run never completed"
        assert [g.generation for g in of(log, ev.GenerationAdvanced)] == list(range(GENERATIONS))
        (done,) = of(log, ev.SearchCompleted)
        assert done.reason == f"completed {GENERATIONS} generations"
        assert not of(before, ev.SearchCompleted), "the node died after the search, not during"
        dead = (await bus.js.stream_info(settings.dlq_stream)).state.messages
        assert dead == 0, "an event was dead-lettered"
        assert not await bus.quarantined()
        assert {r.runner_id for r in of(log, ev.RunStarted)} == {"a", "b"}, "a runner idled"

        restarted_at = time.monotonic()
        cluster.restart(doomed)
        for stream in streams_of(settings):
            await eventually(
                lambda stream=stream: replicated_and_current(bus, stream, 3),
                timeout=30,
                what=f"{stream} on 3 current replicas after the restart",
                interval=0.1,
            )
        caught_up_s = time.monotonic() - restarted_at
        retried = len(of(log, ev.RunStarted)) - len(completed)
        print(
            f"\ncluster started in {cluster.started_in_s:.2f} s; search stalled "
            f"{stalled_s:.2f} s after node {leader} (stream leader) was killed, new leader "
            f"{new_leader}; {len(log)} events, {len(completed)} runs ({retried} started "
            f"again); restarted node current in {caught_up_s:.2f} s; whole test {search_s:.1f} s"
        )
    finally:
        fleet.stop(timeout=15)
        await bus.close()
        cluster.stop()


async def test_a_cluster_without_its_quorum_is_named(tmp_path: Path):
    """With 2 of 3 nodes down JetStream answers nothing (or "temporarily unavailable"):
    connecting says so in words, not a bare nats timeout, once its tries are spent, and leaves
    no connection behind."""
    cluster = start_cluster(tmp_path)
    try:
        settings = cluster_settings(cluster, tmp_path, "QUORUM")
        cluster.kill(1)
        cluster.kill(2)
        with pytest.raises(BrokerUnavailable, match="did not answer while setting up") as said:
            await Bus.connect(settings, "t", setup_tries=2)
        assert "quorum" in str(said.value) and "/jsz" in str(said.value)
        await eventually(
            lambda: "t" not in connections_on(cluster, 0), timeout=5, what="the connection closed"
        )
    finally:
        cluster.stop()


async def test_every_store_is_kept_on_three_replicas(cluster: NatsCluster, tmp_path: Path):
    settings = cluster_settings(cluster, tmp_path, "R3")
    bus = await Bus.connect(settings, "t")
    try:
        for stream in streams_of(settings):
            await eventually(
                lambda stream=stream: replicated_and_current(bus, stream, 3),
                timeout=10,
                what=f"{stream} on 3 current replicas",
            )
    finally:
        await bus.close()


async def test_a_managing_role_moves_existing_stores_to_the_replicas_asked(
    cluster: NatsCluster, tmp_path: Path
):
    single = cluster_settings(cluster, tmp_path, "SCALE").model_copy(update={"stream_replicas": 1})
    first = await Bus.connect(single, "t")
    replicas = [(await first.js.stream_info(s)).config.num_replicas for s in streams_of(single)]
    assert replicas == [1] * 5
    await first.close()
    scaled = await Bus.connect(single.model_copy(update={"stream_replicas": 3}), "t")
    try:
        for stream in streams_of(single):
            await eventually(
                lambda stream=stream: replicated_and_current(scaled, stream, 3),
                timeout=10,
                what=f"{stream} scaled to 3 current replicas",
            )
    finally:
        await scaled.close()


async def test_more_replicas_than_nodes_are_refused_clearly(cluster: NatsCluster, tmp_path: Path):
    settings = cluster_settings(cluster, tmp_path, "R5", stream_replicas=5)
    with pytest.raises(BrokerUnavailable, match="fewer than 5 JetStream nodes up") as refused:
        await Bus.connect(settings, "t")
    assert "GROUNDLOOP_STREAM_REPLICAS" in str(refused.value)


async def test_replicas_on_a_single_server_are_refused_clearly(settings: Settings):
    with pytest.raises(BrokerUnavailable, match="single nats-server, not a JetStream cluster"):
        await Bus.connect(settings.model_copy(update={"stream_replicas": 3}), "t")


async def test_a_client_fails_over_to_the_next_url_in_its_list(tmp_path: Path):
    """Ordered URLs: the first is the preferred node; when it dies the bus carries on through
    the next, and a publish made while it reconnects is stored once. (The node is not the
    log's leader: that failover, with its election, is the search test's.)"""
    cluster = start_cluster(tmp_path)
    settings = cluster_settings(cluster, tmp_path, "ORDER")
    operator = await Bus.connect(settings, "t")
    leader = await eventually(
        lambda: stream_leader(operator, settings.stream), timeout=10, what="a stream leader"
    )
    # Neither the log's leader nor the meta leader: a meta election would stall the reads
    # (consumer creation) behind it for seconds on a loaded machine.
    meta = cluster.meta_leader(0)
    victim = next(i for i, n in enumerate(cluster.nodes) if n.server_name not in (leader, meta))
    order = [cluster.urls[(victim + k) % 3] for k in range(3)]
    bus = await Bus.connect(settings.model_copy(update={"nats_url": ",".join(order)}), "t")
    try:
        assert bus.nc.connected_url.port == cluster.nodes[victim].port
        first = await bus.publish(search_started("before"))
        cluster.kill(victim)
        second = await bus.publish(search_started("after"))
        assert bus.nc.connected_url.geturl() == order[1]
        assert second.seq == first.seq + 1 and not second.duplicate

        async def stored() -> list[str] | None:
            # A read makes a consumer, a JetStream-wide operation that waits while the cluster
            # settles after the kill (over 10 s on a loaded machine): retry until it answers.
            try:
                return [e.search_id async for e in bus.events()]
            except (TimeoutError, NatsTimeout):
                return None

        ids = await eventually(stored, timeout=60, what="a read of the log after the failover")
        assert ids == ["before", "after"]
    finally:
        await bus.close()
        await operator.close()
        cluster.stop()
