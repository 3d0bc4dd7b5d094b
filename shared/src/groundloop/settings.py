"""One settings class for every process: `GROUNDLOOP_*` environment variables or arguments.

Built in `main()` and passed down; nothing reads the environment at import time.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field
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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GROUNDLOOP_", extra="ignore")

    # Broker: empty means "start (or reuse) the embedded nats-server under data_dir".
    nats_url: str | None = None
    # Projections: any SQLAlchemy URL; default SQLite under data_dir.
    db_url: str | None = None
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".groundloop")
    environments_dir: Path = Field(default_factory=default_environments_dir)
    # Subject prefix and stream names, so several deployments can share one NATS account.
    subject_prefix: str = "gl"
    stream: str = "GROUNDLOOP"
    dlq_stream: str = "GROUNDLOOP_DLQ"
    artifacts_bucket: str = "groundloop-artifacts"
    # Two hours: covers publisher retries across broker restarts and a redelivered handler
    # that re-publishes its outputs after a crash; longer-lived duplicates are caught by the
    # consumers' processed-events records. See README "Duplicates".
    duplicate_window_s: float = 7200.0
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    # Telemetry: "none", "console", or "otlp" (then otlp_endpoint is used).
    traces: str = "none"
    otlp_endpoint: str | None = None
    log_level: str = "INFO"
    log_json: bool = False

    def resolved_db_url(self) -> str:
        if self.db_url:
            return self.db_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.data_dir / 'groundloop.db'}"
