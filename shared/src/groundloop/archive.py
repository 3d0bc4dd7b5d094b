"""Archives: keep the log from growing forever without forgetting anything.

The log never ages out (groundloop.bus), so a busy deployment's stream only grows. A finished
search can be moved out of it: `write` copies the search's raw log entries, in stream order,
with their subjects, stream sequences, headers (the role signatures among them) and bodies,
into one compressed file plus a manifest (counts, first and last sequence, sizes, sha256);
`compact` purges the search's subjects from the stream, but only for a finished search
(SearchCompleted or SearchStopped in its log) and only after the archive has been read back
and found identical to what the stream holds. `entries` reads an archive back (refusing one
whose bytes do not match its manifest), so a rebuild can fold archived entries in at their
original sequences, and `restore` republishes them into a stream.

Every archive is also catalogued in the object store (`archives/<search>.manifest.json`),
whether its file went to a folder or to the object store itself: `catalogued` tells any reader
where a compacted search's log went. Files are zstd when the `zstandard` module is installed,
gzip otherwise; reading accepts both.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.js.errors import NotFoundError, ObjectNotFoundError

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.quarantine import Quarantined

FORMAT = 1
CATALOG = "archives"  # object-store prefix of every manifest and of object-store archives
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
FINISHING = (ev.SearchCompleted, ev.SearchStopped)


class ArchiveError(RuntimeError):
    """An archive that cannot be written, trusted or compacted; the message says why."""


@dataclass(frozen=True)
class Entry:
    """One raw log entry as the stream stored it."""

    seq: int
    subject: str
    headers: dict[str, str]
    body: bytes

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"seq": self.seq, "subject": self.subject, "headers": self.headers}
        try:  # event bodies are JSON text: kept readable (and compressible) as they are
            row["body"] = self.body.decode()
        except UnicodeDecodeError:
            row["body_b64"] = base64.b64encode(self.body).decode()
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Entry:
        body = row["body"].encode() if "body" in row else base64.b64decode(row["body_b64"])
        return cls(int(row["seq"]), row["subject"], dict(row["headers"]), body)


@dataclass(frozen=True)
class Manifest:
    search_id: str
    stream: str
    subject_prefix: str
    entries: int
    first_seq: int
    last_seq: int
    entry_bytes: int  # subjects + headers + bodies, as the stream holds them (before overhead)
    archive_bytes: int
    sha256: str  # of the archive file's bytes
    compression: str
    location: str  # a file path, or object-store:<bucket>/<key>
    created_at: str
    finished_by: str | None  # SearchCompleted / SearchStopped, None while the search runs
    format: int = FORMAT

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError) as exc:
            raise ArchiveError(f"{where}: not an archive manifest ({exc})") from None


def compress(data: bytes) -> tuple[bytes, str]:
    try:
        import zstandard  # type: ignore[import-not-found]  # optional: smaller, faster archives
    except ImportError:
        return gzip.compress(data, compresslevel=9, mtime=0), "gzip"
    return zstandard.ZstdCompressor(level=19).compress(data), "zstd"


def decompress(data: bytes, where: str) -> bytes:
    if data.startswith(ZSTD_MAGIC):
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            raise ArchiveError(f"{where} is zstd-compressed: pip install zstandard") from None
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 34)
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise ArchiveError(f"{where}: not a gzip or zstd archive ({exc})") from None


def encode_entries(entries: Iterable[Entry]) -> bytes:
    return b"".join(
        json.dumps(e.to_json(), ensure_ascii=False, sort_keys=True).encode() + b"\n"
        for e in entries
    )


def decode_entries(data: bytes, where: str) -> list[Entry]:
    try:
        return [Entry.from_json(json.loads(line)) for line in data.splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError) as exc:
        raise ArchiveError(f"{where}: an entry is not readable ({exc!r})") from None


def entry_bytes(entry: Entry) -> int:
    headers = sum(len(k) + len(v) + 4 for k, v in entry.headers.items())
    return len(entry.subject) + headers + len(entry.body)


# ---------------------------------------------------------------------- reading the stream


async def stream_entries(bus: Bus, search_id: str, batch: int = 1000) -> AsyncIterator[Entry]:
    """The search's raw entries up to the stream's current end, in stream order."""
    async for msg in bus.stored_messages(search_id, batch):
        headers = dict(msg.headers or {})
        yield Entry(msg.metadata.sequence.stream, msg.subject, headers, msg.data or b"")


async def finishing_event(bus: Bus, entries: list[Entry]) -> str | None:
    for entry in entries:
        read = await bus.read(entry.subject, entry.body, entry.seq, entry.headers)
        if not isinstance(read, Quarantined) and isinstance(read, FINISHING):
            return read.TYPE
    return None


# ---------------------------------------------------------------------- write, read, verify


def manifest_key(search_id: str) -> str:
    return f"{CATALOG}/{search_id}.manifest.json"


async def write(bus: Bus, search_id: str, folder: Path | None) -> Manifest:
    """Archive the search into `folder` (None: the object store); catalogue the manifest."""
    entries = [e async for e in stream_entries(bus, search_id)]
    if not entries:
        raise ArchiveError(
            f"no entries of search {search_id!r} in stream {bus.settings.stream}: nothing to "
            "archive (already compacted? `groundloop archive show` says where it went)"
        )
    data, compression = compress(encode_entries(entries))
    name = f"{search_id}.jsonl.{'zst' if compression == 'zstd' else 'gz'}"
    if folder is None:
        key = f"{CATALOG}/{name}"
        await bus.put_artifact(key, data)
        location = f"object-store:{bus.settings.artifacts_bucket}/{key}"
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_bytes(data)
        location = str(path.resolve())
    manifest = Manifest(
        search_id=search_id,
        stream=bus.settings.stream,
        subject_prefix=bus.settings.subject_prefix,
        entries=len(entries),
        first_seq=entries[0].seq,
        last_seq=entries[-1].seq,
        entry_bytes=sum(entry_bytes(e) for e in entries),
        archive_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        compression=compression,
        location=location,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        finished_by=await finishing_event(bus, entries),
    )
    if folder is not None:
        (folder / f"{search_id}.manifest.json").write_bytes(manifest.to_bytes())
    await bus.put_artifact(manifest_key(search_id), manifest.to_bytes())
    return manifest


async def catalogued(bus: Bus, search_id: str) -> Manifest | None:
    """The manifest of the search's last archive, from the object store (None: never archived)."""
    try:
        data = await bus.get_artifact(manifest_key(search_id))
    except (ObjectNotFoundError, NotFoundError):
        return None
    return Manifest.from_bytes(data, f"object store {manifest_key(search_id)}")


async def archived_note(bus: Bus, search_id: str) -> str | None:
    """One line for readers of a search whose log is no longer (all) in the stream."""
    manifest = await catalogued(bus, search_id)
    if manifest is None:
        return None
    return (
        f"search {search_id}: {manifest.entries} entries (seq {manifest.first_seq}-"
        f"{manifest.last_seq}) archived {manifest.created_at} to {manifest.location}; "
        f"`groundloop archive restore {manifest.location}` puts them back"
    )


async def load(bus: Bus | None, source: str | Path) -> tuple[Manifest, list[Entry]]:
    """Read and verify an archive: a manifest or archive file (its manifest beside it), a
    folder plus search id is `folder/<search>.manifest.json`, or object-store:<bucket>/<key>
    (needs `bus`). Refuses an archive whose bytes or entries disagree with its manifest."""
    text = str(source)
    if text.startswith("object-store:"):
        if bus is None:
            raise ArchiveError(f"{text}: reading the object store needs a broker")
        key = text.split("/", 1)[1]
        search_id = Path(key).name.split(".jsonl")[0]
        manifest = await catalogued(bus, search_id)
        if manifest is None or manifest.location != text:
            raise ArchiveError(f"{text}: no catalogued manifest names this archive")
        data = await bus.get_artifact(key)
    else:
        path = Path(text)
        search_id = path.name.split(".jsonl")[0].removesuffix(".manifest.json")
        manifest_path = path.with_name(f"{search_id}.manifest.json")
        if not manifest_path.is_file():
            raise ArchiveError(f"{path}: no manifest {manifest_path.name} beside it")
        manifest = Manifest.from_bytes(manifest_path.read_bytes(), str(manifest_path))
        archive = path.with_name(Path(manifest.location).name)
        if not archive.is_file():
            raise ArchiveError(f"{manifest_path}: its archive {archive.name} is missing")
        data = archive.read_bytes()
    return manifest, verify(manifest, data, text)


def verify(manifest: Manifest, data: bytes, where: str) -> list[Entry]:
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        raise ArchiveError(
            f"{where}: sha256 {digest[:16]}… is not the manifest's {manifest.sha256[:16]}…: the "
            "archive was changed or damaged; restore it from a copy, or archive the search again"
        )
    entries = decode_entries(decompress(data, where), where)
    seqs = [e.seq for e in entries]
    if (
        len(entries) != manifest.entries
        or not entries
        or (seqs[0], seqs[-1]) != (manifest.first_seq, manifest.last_seq)
        or seqs != sorted(set(seqs))
    ):
        raise ArchiveError(f"{where}: its entries do not match its manifest's counts")
    return entries


# ---------------------------------------------------------------------- compact and restore


async def compact(bus: Bus, search_id: str) -> Manifest:
    """Purge a finished, archived search from the stream after checking the archive reads back
    identical to what the stream holds; raises ArchiveError saying why it will not."""
    manifest = await catalogued(bus, search_id)
    if manifest is None:
        raise ArchiveError(
            f"search {search_id!r} has no archive: `groundloop archive {search_id} --to DIR` first"
        )
    held = [e async for e in stream_entries(bus, search_id)]
    if not held:
        raise ArchiveError(f"search {search_id!r} holds nothing in the stream: already compacted")
    finished = await finishing_event(bus, held)
    if finished is None:
        raise ArchiveError(
            f"search {search_id!r} is not finished (no SearchCompleted or SearchStopped in its "
            "log): compacting it would pull the log from under its services; stop it first "
            "(or let it complete), archive it again, then compact"
        )
    _, archived = await load(bus, manifest.location)
    if archived != held:
        raise ArchiveError(
            f"the archive of {search_id!r} ({len(archived)} entries, seq {manifest.first_seq}-"
            f"{manifest.last_seq}) differs from the {len(held)} entries the stream holds now "
            f"(seq {held[0].seq}-{held[-1].seq}): archive it again, then compact"
        )
    # Up to the last archived sequence only: an entry that lands after the check stays.
    await bus.js.purge_stream(
        bus.settings.stream, subject=bus.subject_filter(search_id=search_id), seq=held[-1].seq + 1
    )
    return manifest


async def restore(bus: Bus, manifest: Manifest, entries: list[Entry]) -> tuple[int, int]:
    """Republish archived entries, signatures and all (at new stream sequences); returns
    (stored, already there): an entry the stream still holds is not published twice."""
    if manifest.subject_prefix != bus.settings.subject_prefix:
        raise ArchiveError(
            f"the archive of {manifest.search_id!r} holds subjects {manifest.subject_prefix}.>, "
            f"this broker's log is {bus.settings.subject_prefix}.>: set "
            f"GROUNDLOOP_SUBJECT_PREFIX={manifest.subject_prefix} to restore it"
        )
    present = {(e.subject, e.body) async for e in stream_entries(bus, manifest.search_id)}
    stored = skipped = 0
    for entry in entries:
        if (entry.subject, entry.body) in present:
            skipped += 1
            continue
        # Server directives are dropped: the duplicate window may still remember the message
        # id from before the purge, and would then silently drop the restored copy.
        headers = {k: v for k, v in entry.headers.items() if not k.startswith("Nats-")}
        await bus.js.publish(entry.subject, entry.body, headers=headers)
        stored += 1
    return stored, skipped
