"""Archives end to end: two real synthetic searches through the real CLI on a real nats-server;
one is archived, compacted out of the stream, and its projections rebuilt from the archive
alone; a running search and a tampered archive are refused.

The searches share one stream (module fixture); each test leaves the other search alone.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from groundloop import archive
from groundloop.api.store import make_engine, table_snapshot
from groundloop.bus import Bus
from groundloop.permissions import Names
from groundloop.settings import Settings
from tests import test_search_e2e as e2e
from tests.factories import search_started
from tests.test_search_e2e import CLI, groundloop, search, settings_for

cli_env = e2e.cli_env


def held(settings: Settings, search_id: str) -> list[archive.Entry]:
    async def read() -> list[archive.Entry]:
        bus = await Bus.connect(settings, "test-archive")
        try:
            return [e async for e in archive.stream_entries(bus, search_id)]
        finally:
            await bus.close()

    return asyncio.run(read())


def snapshot(settings: Settings) -> dict:
    engine = make_engine(settings.db_url)
    try:
        return table_snapshot(engine)
    finally:
        engine.dispose()


def refused(settings: Settings, *args: str) -> str:
    """Run a CLI command that must fail with exit 2; its output."""
    proc = subprocess.run(
        [*CLI, *args], env=cli_env(settings), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def recorded(nats_server, tmp_path_factory) -> Iterator[Settings]:
    plain = settings_for(nats_server.url, tmp_path_factory.mktemp("archive"), "ARCHIVE")
    settings = plain.model_copy(update={"nats_credentials_dir": nats_server.credentials})
    nats_server.serve(Names.of(settings))  # the roles' permissions on this module's names
    # The e2e helpers pass the credentials on: every CLI process logs in as its role and signs.
    search(settings, "kept", "--generations", "1", "--ideas", "1", "--final-seeds", "1")
    search(settings, "gone", "--generations", "2", "--ideas", "2", "--final-seeds", "1")
    yield settings


def test_archive_compact_and_rebuild_from_the_archive(recorded: Settings, tmp_path: Path) -> None:
    s = recorded
    groundloop(s, "replay", "rebuild")
    before = snapshot(s)
    gone, kept = held(s, "gone"), held(s, "kept")
    assert gone and kept

    out = groundloop(s, "archive", "gone", "--to", str(tmp_path))
    assert f"archived {len(gone)} entries of gone" in out
    manifest_path = tmp_path / "gone.manifest.json"
    manifest, entries = asyncio.run(archive.load(None, manifest_path))
    assert entries == gone  # subjects, sequences, headers (signatures) and bodies, in order
    assert manifest.finished_by == "SearchCompleted"

    out = groundloop(s, "archive", "compact", "gone")
    assert f"{len(gone)} entries purged" in out
    assert held(s, "gone") == []
    assert held(s, "kept") == kept
    assert str(tmp_path) in groundloop(s, "archive", "show", "gone")

    groundloop(s, "replay", "rebuild")  # the stream alone no longer knows the search
    assert {r["search_id"] for r in snapshot(s)["searches"]} == {"kept"}
    assert "archived" in groundloop(s, "events", "tail", "--search", "gone")  # says where
    groundloop(s, "archive", "rebuild", str(manifest_path))
    assert snapshot(s) == before
    groundloop(s, "replay", "rebuild")
    groundloop(s, "replay", "rebuild", "--from-archive", str(manifest_path))  # the same fold
    assert snapshot(s) == before

    # Restored into the stream, the search is whole again for any reader (new sequences).
    assert "restored" in groundloop(s, "archive", "restore", str(manifest_path))
    back = held(s, "gone")
    assert [(e.subject, e.body) for e in back] == [(e.subject, e.body) for e in gone]
    assert all(g.headers.get("Groundloop-Signature") for g in gone)  # signed when archived
    assert [e.headers["Groundloop-Signature"] for e in back] == [
        g.headers["Groundloop-Signature"] for g in gone
    ]
    groundloop(s, "replay", "rebuild")
    assert snapshot(s) == before


def test_a_running_search_is_not_compacted(recorded: Settings, tmp_path: Path) -> None:
    async def start() -> None:
        bus = await Bus.connect(recorded, "test-archive")
        try:
            await bus.publish(search_started("running", generations=1, ideas_per_generation=1))
        finally:
            await bus.close()

    asyncio.run(start())
    assert "still running" in groundloop(recorded, "archive", "running", "--to", str(tmp_path))
    assert "is not finished" in refused(recorded, "archive", "compact", "running")
    assert len(held(recorded, "running")) == 1


def test_a_tampered_archive_is_refused(recorded: Settings, tmp_path: Path) -> None:
    kept = held(recorded, "kept")
    groundloop(recorded, "archive", "kept", "--to", str(tmp_path))
    (archive_file,) = [p for p in tmp_path.iterdir() if ".jsonl." in p.name]
    data = bytearray(archive_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    archive_file.write_bytes(bytes(data))
    assert "was changed or damaged" in refused(
        recorded, "archive", "verify", str(tmp_path / "kept.manifest.json")
    )
    assert "was changed or damaged" in refused(recorded, "archive", "compact", "kept")
    assert held(recorded, "kept") == kept


def test_where_to_is_said_once(recorded: Settings) -> None:
    assert "--to DIR or --to-object-store" in refused(recorded, "archive", "kept")


def test_object_store_archives_round_trip(recorded: Settings) -> None:
    out = groundloop(recorded, "archive", "kept", "--to-object-store")
    location = out.split(" to ", 1)[1].split(";")[0].strip()
    assert location.startswith("object-store:")
    assert "sha256 matches" in groundloop(recorded, "archive", "verify", location)
