"""The broker admits only its roles: each role's nkey may publish only the events it emits,
a client without credentials (or with a key the server does not know) cannot connect, a role
cannot take another role's work, and the committed deploy config is the rendered map."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from nats.errors import TimeoutError as NatsTimeout

from groundloop import identity
from groundloop import permissions as perm
from groundloop.broker import NatsServer, find_nats_server, free_port
from groundloop.bus import BrokerUnavailable, Bus
from groundloop.events import encode
from groundloop.settings import Settings
from tests import factories
from tests.paths import REPO_ROOT

DEPLOY_CONF = REPO_ROOT / "deploy" / "nats" / "groundloop.conf"


def test_who_may_publish_what_is_the_documented_map():
    emits = {role: set(grant.emits) for role, grant in perm.ROLES.items()}
    assert emits["runner"] == {"RunStarted", "RunCompleted"}
    assert emits["projector"] == set()
    assert emits["implementer"] == {"PatchReady", "PatchFailed", "SearchStopped"}
    assert "PatchReady" not in emits["runner"] | emits["evolver"] | emits["ideator"]
    assert perm.role_of("runner-host7") == "runner"
    assert perm.role_of("cli-tail") == "cli"
    assert perm.role_of("rl-trainer") == "rl-trainer"
    assert perm.role_of("replay") == "projector"
    assert perm.role_of("t") == perm.OPERATOR
    assert perm.producer_refusal("runner", "RunCompleted", "runner") is None
    assert "may not publish PatchReady" in (
        perm.producer_refusal("runner", "PatchReady", "runner") or ""
    )
    assert "names producer 'implementer'" in (
        perm.producer_refusal("runner", "RunCompleted", "implementer") or ""
    )
    # fork/import copies: any type, but only as history
    assert perm.producer_refusal("cli", "RunCompleted", "history:runner") is None
    assert perm.producer_refusal("cli", "RunCompleted", "runner") is not None


def test_committed_deploy_config_is_the_rendered_map():
    assert DEPLOY_CONF.read_text() == perm.render_deploy(), (
        "deploy/nats/groundloop.conf is out of date: run "
        "python -m groundloop.permissions render deploy/nats/groundloop.conf"
    )


def _self_signed(directory: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 signed by it, made with openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=groundloop-test-ca")  # fmt: skip
    run("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext")  # fmt: skip
    return directory


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


@needs_openssl
def test_deploy_config_is_accepted_by_nats_server(tmp_path: Path):
    """The committed config parses and loads with keys from the environment (`-t`: test the
    configuration and exit), TLS files and store moved to a temporary folder."""
    tls = _self_signed(tmp_path)
    keys = identity.generate(tmp_path / "credentials")
    conf = tmp_path / "groundloop.conf"
    text = DEPLOY_CONF.read_text().replace("/etc/nats/tls", str(tls))
    conf.write_text(text.replace("/data/jetstream", str(tmp_path / "js")))
    env = {**os.environ, **{perm.key_variable(role): key for role, key in keys.items()}}
    checked = subprocess.run(
        [find_nats_server(), "-c", str(conf), "-t"], env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    env.pop(perm.key_variable("runner"))
    missing = subprocess.run(
        [find_nats_server(), "-c", str(conf), "-t"], env=env, capture_output=True, text=True
    )
    assert missing.returncode != 0 and "GROUNDLOOP_NKEY_RUNNER" in missing.stdout + missing.stderr


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory):
    """A broker with authentication and no door for clients without credentials."""
    root = tmp_path_factory.mktemp("locked")
    server = NatsServer(root / "store", free_port(), credentials=root / "credentials").start()
    yield server
    server.stop()


def _settings(server: NatsServer, tmp_path: Path, **over: object) -> Settings:
    values: dict = {"nats_url": server.url, "nats_credentials_dir": server.credentials}
    return Settings(data_dir=tmp_path, **(values | over))


async def test_a_client_without_credentials_cannot_connect(locked: NatsServer, tmp_path: Path):
    with pytest.raises(BrokerUnavailable, match="refused 'cli' with no credentials"):
        await Bus.connect(_settings(locked, tmp_path, nats_credentials_dir=None), "cli", 1.0)
    stranger = tmp_path / "stranger"
    identity.generate(stranger, ["cli"])  # a well-formed key the server does not know
    with pytest.raises(BrokerUnavailable, match="refused 'cli' with the nkey of role cli"):
        await Bus.connect(_settings(locked, tmp_path, nats_credentials_dir=stranger), "cli", 1.0)


async def _stored(bus: Bus) -> int:
    return (await bus.stream_state())["messages"]


async def _denied(bus: Bus, subject: str, body: bytes) -> None:
    """A publish the broker must refuse: no acknowledgement ever comes."""
    with pytest.raises((NatsTimeout, asyncio.TimeoutError)):
        await bus.js.publish(subject, body, timeout=0.5)


async def test_a_role_cannot_publish_another_roles_events(locked: NatsServer, tmp_path: Path):
    settings = _settings(locked, tmp_path)
    operator = await Bus.connect(settings, "operator-check")
    runner = await Bus.connect(settings, "runner-a")
    projector = await Bus.connect(settings, "projector")
    try:
        events = factories.one_search("perm", ideas=1)
        patch = next(e for e in events if e.TYPE == "PatchReady")
        run_started = next(e for e in events if e.TYPE == "RunStarted")
        before = await _stored(operator)
        await _denied(runner, runner.subject_of(patch), encode(patch))
        await _denied(projector, projector.subject_of(run_started), encode(run_started))
        assert await _stored(operator) == before, "a refused publish reached the log"
        published = await runner.publish(run_started.model_copy(update={"producer": "runner"}))
        assert published.seq > before  # its own event type goes through
        # The runner's key cannot fetch, delete or dead-letter as another role's consumer.
        stream = settings.stream
        for subject in (
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.evolver",
            f"$JS.API.CONSUMER.DELETE.{stream}.runner-cpu",
            f"$JS.API.STREAM.UPDATE.{stream}",
            f"$JS.API.STREAM.PURGE.{stream}",
        ):
            with pytest.raises((NatsTimeout, asyncio.TimeoutError)):
                await runner.nc.request(subject, b"{}", timeout=0.5)
        await _denied(runner, f"{settings.subject_prefix}_dlq.evolver", b"x")
    finally:
        for bus in (operator, runner, projector):
            await bus.close()


async def test_every_role_that_reads_artifacts_can_and_only_writers_write(
    locked: NatsServer, tmp_path: Path
):
    """Logs, large diffs and policy checkpoints: the runner reads large diffs and writes logs,
    the rl-trainer reads and writes checkpoints, the API and the CLI read logs. nats-py's
    object-store get looks the bucket's stream up by subject first (STREAM.NAMES): without it
    every get under authentication timed out."""
    settings = _settings(locked, tmp_path)
    operator = await Bus.connect(settings, "operator-check")
    await operator.ensure()
    await operator.put_artifact("probe/diff", b"x" * 300_000)  # several chunks
    try:
        for name in ("runner-a", "rl-trainer", "implementer", "api", "cli", "evolver"):
            bus = await Bus.connect(settings, name, 2.0)
            try:
                assert await asyncio.wait_for(bus.get_artifact("probe/diff"), 5) == b"x" * 300_000
                if perm.ROLES[perm.role_of(name)].artifacts:
                    await bus.put_artifact(f"probe/{name}", name.encode())
                    assert await operator.get_artifact(f"probe/{name}") == name.encode()
                    # A redo: the same bytes again (no write), then new bytes (purges the old).
                    await asyncio.wait_for(bus.put_artifact(f"probe/{name}", name.encode()), 5)
                    await asyncio.wait_for(bus.put_artifact(f"probe/{name}", b"redone"), 5)
                    assert await operator.get_artifact(f"probe/{name}") == b"redone"
                else:
                    with pytest.raises((NatsTimeout, asyncio.TimeoutError)):
                        await asyncio.wait_for(bus.put_artifact(f"probe/{name}", b"no"), 2)
            finally:
                await bus.close()
    finally:
        await operator.close()


async def test_services_of_the_fixture_run_with_their_own_role(settings: Settings):
    """The shared fixture's broker enforces the same map: a runner connection there is a
    runner, and an implementer event from it never reaches the log."""
    operator = await Bus.connect(settings, "t")
    runner = await Bus.connect(settings, "runner-fixture")
    try:
        assert runner.role == "runner" and operator.role == perm.OPERATOR
        patch = next(e for e in factories.one_search("fx", ideas=1) if e.TYPE == "PatchReady")
        await _denied(runner, runner.subject_of(patch), encode(patch))
        assert await _stored(operator) == 0
    finally:
        await runner.close()
        await operator.close()


@needs_openssl
async def test_tls_broker_needs_the_ca(tmp_path: Path):
    from groundloop.broker import TlsFiles

    tls = _self_signed(tmp_path)
    server = NatsServer(
        tmp_path / "store",
        free_port(),
        credentials=tmp_path / "credentials",
        tls=TlsFiles(tls / "server.crt", tls / "server.key"),
    ).start()
    try:
        good = _settings(server, tmp_path, nats_tls_ca=tls / "ca.crt")
        bus = await Bus.connect(good, "cli")
        started = factories.search_started("tls")
        assert (await bus.publish(started)).seq == 1
        assert [e async for e in bus.events("tls")] == [started]
        await bus.close()
        with pytest.raises(BrokerUnavailable):
            await Bus.connect(_settings(server, tmp_path), "cli", 1.0)  # no CA: untrusted
    finally:
        server.stop()
