"""Fixtures for every test folder (registered by the repo-root conftest.py): a real nats-server
per test module and settings with names unique to each test."""

from __future__ import annotations

from pathlib import Path

import pytest

from groundloop.broker import NatsServer, free_port
from groundloop.settings import Settings


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory):
    """A real nats-server with JetStream on a random port and a temporary store dir."""
    server = NatsServer(tmp_path_factory.mktemp("nats"), free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def settings(nats_server: NatsServer, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings pointing at the module's broker, with names unique to this test so tests in
    one module never see each other's streams or consumers."""
    tag = "".join(ch if ch.isalnum() else "_" for ch in request.node.name)[:40].upper()
    return Settings(
        nats_url=nats_server.url,
        data_dir=tmp_path / "data",
        db_url=f"sqlite:///{tmp_path / 'projections.db'}",
        subject_prefix=f"t{abs(hash(tag)) % 10**8}",
        stream=f"GL_{tag}",
        dlq_stream=f"GLDLQ_{tag}",
        artifacts_bucket=f"art_{tag.lower()}",
        ack_wait_s=2.0,
    )
