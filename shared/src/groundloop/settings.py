"""One settings class for every process: `GROUNDLOOP_*` environment variables or arguments.

Built in `main()` and passed down; nothing reads the environment at import time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_environments_dir() -> Path:
    """Where the environments are installed as data: `<prefix>/share/groundloop/environments`
    (dev.py links the checkout's folder there; an image copies it there). A checkout's
    `./environments` is the fallback for a bare `pip install`. Set GROUNDLOOP_ENVIRONMENTS_DIR
    to use any other folder."""
    installed = Path(sys.prefix) / "share" / "groundloop" / "environments"
    if installed.is_dir():
        return installed
    here = Path.cwd() / "environments"
    return here if here.is_dir() else installed


NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def _checked_nats_url(url: str) -> str:
    """`url` if a NATS client can dial it: a scheme NATS speaks, a host, a valid port. A bare
    host:port means nats://host:port, as it does to nats-py."""
    if "://" not in url:
        url = f"nats://{url}"
    split = urlsplit(url)
    try:
        port = split.port
    except ValueError:
        port = -1
    if split.scheme not in NATS_SCHEMES or not split.hostname or port == -1:
        raise ValueError(
            f"{url!r} is not a NATS URL: write [{'|'.join(NATS_SCHEMES)}://]host[:port], and "
            "separate the nodes of a cluster with commas (nats://a:4222,nats://b:4222)"
        )
    return url


class Settings(BaseSettings):
    """What every process reads: the broker, the projections' database, folders, telemetry."""

    model_config = SettingsConfigDict(env_prefix="GROUNDLOOP_", extra="ignore")

    nats_url: str | None = Field(
        default=None,
        description="NATS broker URL, or several comma-separated (a list in code): the nodes of "
        "a cluster, tried in the order given (first = preferred; the client also learns the "
        "others from the cluster); empty: start (or reuse) an embedded nats-server under "
        "data_dir",
    )
    stream_replicas: int = Field(
        default=1,
        ge=1,
        le=5,
        description="copies a JetStream cluster keeps of the log, dead-letter and quarantine "
        "streams, the processed-events KV and the artifact store (1: a single server; 3 in "
        "production: one node may fail); more than the cluster's nodes is refused",
    )
    db_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the projections; empty: SQLite under data_dir",
    )
    data_dir: Path = Field(
        default_factory=lambda: Path.home() / ".groundloop",
        description="broker data, database, reports (default ~/.groundloop)",
    )
    environments_dir: Path = Field(
        default_factory=default_environments_dir,
        description="where environments are found (default <prefix>/share/groundloop/environments, "
        "else ./environments)",
    )
    nats_credentials_dir: Path | None = Field(
        default=None,
        description="folder with this role's nkey seed (<role>.nk) and every role's public keys "
        "(public-keys.json); empty: the embedded broker's, if this data dir runs it, else none "
        "(no authentication, events not verified)",
    )
    verify_events: bool | None = Field(
        default=None,
        description="check every event's signature and producer; empty: when credentials are "
        "set. false reads a log written before authentication was switched on",
    )
    nats_tls_ca: Path | None = Field(
        default=None, description="CA certificate that signed the broker's TLS certificate"
    )
    nats_tls_cert: Path | None = Field(
        default=None, description="client certificate, when the broker verifies clients (mTLS)"
    )
    nats_tls_key: Path | None = Field(default=None, description="key of nats_tls_cert")
    subject_prefix: str = Field(
        default="gl", description="NATS subject prefix, so deployments can share an account"
    )
    stream: str = Field(default="GROUNDLOOP", description="JetStream stream of the event log")
    dlq_stream: str = Field(default="GROUNDLOOP_DLQ", description="dead-letter stream")
    artifacts_bucket: str = Field(
        default="groundloop-artifacts", description="object-store bucket for diffs and logs"
    )
    # Two hours: covers publisher retries across broker restarts and a redelivered handler
    # that re-publishes its outputs after a crash (README "Duplicates").
    duplicate_window_s: float = Field(
        default=7200.0, description="JetStream duplicate window for event ids, in seconds"
    )
    ack_wait_s: float = Field(
        default=30.0, description="seconds before an unacknowledged message is redelivered"
    )
    max_deliver: int = Field(
        default=5, description="deliveries before a message goes to the dead-letter stream"
    )
    traces: str = Field(default="none", description='"none", "console" or "otlp"')
    otlp_endpoint: str | None = Field(
        default=None, description="OTLP HTTP endpoint when traces is otlp"
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="bearer token the API's write endpoints (start, stop, fork a search) "
        "require; empty: they are refused (the read API and dashboard need none)",
    )
    """A shared secret, not an identity: whoever holds it may start, stop and fork searches
    through the API (`Authorization: Bearer <token>`). Set GROUNDLOOP_API_TOKEN to a long
    random string (e.g. `python -c "import secrets; print(secrets.token_urlsafe(32))"`)."""
    log_level: str = Field(default="INFO", description="Python logging level")
    log_json: bool = Field(default=False, description="log one JSON object per line")

    @field_validator("nats_url", mode="before")
    @classmethod
    def _nats_urls(cls, value: object) -> str | None:
        """One URL, several comma-separated, or a list of them: each checked, kept as one
        comma-separated string (so the variable and the field read alike)."""
        if value is None:
            return None
        parts = (
            [str(v) for v in value] if isinstance(value, list | tuple) else str(value).split(",")
        )
        urls = [_checked_nats_url(p.strip()) for p in parts if p.strip()]
        return ",".join(urls) or None

    def nats_servers(self) -> list[str]:
        """The broker's URLs, in the order given (nats-py's `servers`)."""
        return self.nats_url.split(",") if self.nats_url else []

    def resolved_db_url(self) -> str:
        if self.db_url:
            return self.db_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.data_dir / 'groundloop.db'}"
