"""Fixtures for every test folder (registered by the repo-root conftest.py): a real nats-server
per test module and settings with names unique to each test.

The server runs with the production permission map (`groundloop.permissions`): the
`settings` fixture carries the generated credentials, so every process of a test logs in as
its role (services by their role names; any other name, e.g. a test's "t", as the operator)
and every event is signed and verified. Clients without credentials (the CLI subprocesses of
tests that build their own settings) are let in as the operator.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from groundloop.broker import NatsServer, free_port
from groundloop.permissions import OPERATOR, Names
from groundloop.settings import Settings


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory):
    """A real nats-server with JetStream and authentication on a random port and a temporary
    store dir."""
    root = tmp_path_factory.mktemp("nats")
    server = NatsServer(
        root / "store", free_port(), credentials=root / "credentials", anonymous_role=OPERATOR
    ).start()
    yield server
    server.stop()


@pytest.fixture
def settings(nats_server: NatsServer, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings pointing at the module's broker, with names unique to this test so tests in
    one module never see each other's streams or consumers, and the broker's credentials."""
    # Cut to a length the names allow, with a digest of the whole name: parametrized tests
    # share a long prefix, and cut alone they got the same stream.
    name = request.node.name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    tag = ("".join(ch if ch.isalnum() else "_" for ch in name)[:31] + "_" + digest).upper()
    settings = Settings(
        nats_url=nats_server.url,
        nats_credentials_dir=nats_server.credentials,
        data_dir=tmp_path / "data",
        db_url=f"sqlite:///{tmp_path / 'projections.db'}",
        subject_prefix=f"t{abs(hash(tag)) % 10**8}",
        stream=f"GL_{tag}",
        dlq_stream=f"GLDLQ_{tag}",
        artifacts_bucket=f"art_{tag.lower()}",
        ack_wait_s=2.0,
    )
    nats_server.serve(Names.of(settings))  # the roles' permissions on this test's names
    return settings
