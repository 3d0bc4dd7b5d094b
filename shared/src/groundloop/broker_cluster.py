"""A JetStream cluster of local nats-servers, for the failover tests and local experiments.

`NatsCluster(root, size=3).start()` runs `size` `groundloop.broker.NatsServer`s on loopback
as one cluster: routes between every pair, one store dir per node, each its own server_name,
the same credentials and permission map as a single server. It is the stand-in for the
production cluster (the NATS Helm chart with 3 replicas, deploy/k8s/README.md); `start`
returns once JetStream has a meta leader that hears every node, so a stream placed on all
of them can be created at once.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from groundloop.broker import BrokerError, ClusterRoutes, NatsServer, free_port
from groundloop.permissions import Names


@dataclass
class NatsCluster:
    """`size` nats-servers on loopback forming one JetStream cluster `name`: node i is server
    `n<i>`, stores under `root/n<i>` and dials every other node's route port. Credentials and
    permissions are NatsServer's, one folder for every node (a role's key works on any node).
    `url` (every node, comma-separated) is a GROUNDLOOP_NATS_URL; `kill(i)` and `restart(i)`
    are the failover tests' node crash and recovery."""

    root: Path
    size: int = 3
    name: str = "groundloop"
    credentials: Path | None = None
    names: list[Names] = field(default_factory=lambda: [Names()])
    anonymous_role: str | None = None
    nodes: list[NatsServer] = field(default_factory=list)
    started_in_s: float = 0.0  # how long `start` took, meta leader included

    def __post_init__(self) -> None:
        if self.size < 1:
            raise BrokerError(f"a cluster needs at least one node, not {self.size}")
        ports: list[int] = []
        while len(ports) < 3 * self.size:  # client, route and monitor port of every node
            port = free_port()
            if port not in ports:
                ports.append(port)
        client, route, monitor = (ports[k * self.size : (k + 1) * self.size] for k in range(3))
        for i in range(self.size):
            peers = tuple(p for j, p in enumerate(route) if j != i)
            self.nodes.append(
                NatsServer(
                    self.root / f"n{i}",
                    client[i],
                    credentials=self.credentials,
                    names=list(self.names),  # each node's own list: `serve` appends to it
                    anonymous_role=self.anonymous_role,
                    cluster=ClusterRoutes(f"n{i}", self.name, route[i], peers),
                    monitor_port=monitor[i],
                )
            )

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every node, then wait until each is ready and JetStream has a meta leader
        that every node knows (before that, stream creation fails with "JetStream system
        temporarily unavailable")."""
        began = time.monotonic()
        for node in self.nodes:
            node.launch()
        try:
            for node in self.nodes:
                node.wait_ready(timeout)
            self.wait_meta_leader(range(self.size), timeout)
        except BrokerError:
            self.stop()
            raise
        self.started_in_s = time.monotonic() - began
        return self

    def kill(self, i: int) -> None:
        """SIGKILL node i: no flush, no goodbye to its peers."""
        self.nodes[i].kill()

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Start node i again on its ports and store; returns once it follows the meta leader."""
        self.nodes[i].start(timeout)
        self.wait_meta_leader([i], timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def serve(self, names: Names) -> None:
        for node in self.nodes:
            node.serve(names)

    def monitor(self, i: int, endpoint: str) -> dict:
        """Node i's monitoring endpoint as JSON, e.g. "jsz" or "connz"."""
        port = self.nodes[i].monitor_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{endpoint}", timeout=2) as r:
            return json.loads(r.read())

    def meta_leader(self, i: int) -> str | None:
        """The meta leader's server name as node i sees it (None: no leader, or i is down)."""
        try:
            meta = self.monitor(i, "jsz").get("meta_cluster") or {}
        except (OSError, ValueError):
            return None
        return meta.get("leader") or None

    def _leader_hears_everyone(self, leader: str) -> bool:
        """Whether the meta leader sees every other node current: until then it counts the
        silent ones as offline and cannot place a stream on `size` replicas."""
        index = next((i for i, n in enumerate(self.nodes) if n.server_name == leader), None)
        if index is None:
            return False
        try:
            peers = (self.monitor(index, "jsz").get("meta_cluster") or {}).get("replicas") or []
        except (OSError, ValueError):
            return False
        live = [p for p in peers if p.get("current") and not p.get("offline")]
        return len(live) >= self.size - 1

    def wait_meta_leader(self, nodes: Iterable[int], timeout: float) -> str:
        nodes = list(nodes)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaders = {self.meta_leader(i) for i in nodes}
            if len(leaders) == 1 and None not in leaders:
                leader = str(leaders.pop())
                if self._leader_hears_everyone(leader):
                    return leader
            time.sleep(0.05)
        raise BrokerError(
            f"no JetStream meta leader known to nodes {nodes} after {timeout:.0f}s; "
            f"see {', '.join(str(self.nodes[i].log_path) for i in nodes)}"
        )
