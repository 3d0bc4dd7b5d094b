"""Artifacts (run logs, large diffs, checkpoints) in the JetStream object store, mixed into
`Bus`. Objects are written in nats-py's layout (chunks on `$O.<bucket>.C.<nuid>`, one meta
record per key on `$O.<bucket>.M.<base64 key>`), so either side reads what the other wrote,
with fewer round trips than nats-py's own put and get for the small objects most artifacts are.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from nats.js import api
from nats.js.errors import APIError, DigestMismatchError, ObjectNotFoundError

from groundloop.permissions import Names

WRONG_LAST_SEQUENCE = 10071  # JetStream error code: expected-last-subject-sequence mismatch

# nats-py's object-store chunk size: objects written here read like the ones it writes.
OBJECT_CHUNK_BYTES = 128 * 1024


class ArtifactStore:
    """Mixed into `Bus`, which opens the object store (`_objects`) in `ensure`."""

    js: Any
    names: Names
    _objects: Any

    async def put_artifact(self, key: str, data: bytes) -> str:
        """Store `data` at `key`; a redo that stores the very same bytes changes nothing.

        nats-py's put looks the key up twice before writing: four round trips for a new key,
        as nearly every key is (run log chunks and indexes, diffs, checkpoints). Here the
        chunks go to a fresh subject and the meta lands only if the key has none: two. A key
        written before is then looked up, and kept (same bytes: the new chunks are purged) or
        replaced (its old chunks purged)."""
        bucket, stream = self.names.bucket, f"OBJ_{self.names.bucket}"
        info = api.ObjectInfo(
            name=key,
            bucket=bucket,
            nuid=uuid.uuid4().hex,
            size=len(data),
            chunks=-(-len(data) // OBJECT_CHUNK_BYTES),
            mtime=datetime.now(UTC).isoformat(),
            digest=_object_digest(data),
            options=api.ObjectMetaOptions(max_chunk_size=OBJECT_CHUNK_BYTES),
        )
        chunks = f"$O.{bucket}.C.{info.nuid}"
        try:
            for start in range(0, len(data), OBJECT_CHUNK_BYTES):
                await self.js.publish(chunks, data[start : start + OBJECT_CHUNK_BYTES])
        except Exception:
            with contextlib.suppress(Exception):  # no meta names them yet: nothing reads them
                await self.js.purge_stream(stream, subject=chunks)
            raise
        meta_subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(key.encode()).decode()}"
        meta, rollup = json.dumps(info.as_dict()).encode(), {"Nats-Rollup": "sub"}
        try:
            first = {**rollup, "Nats-Expected-Last-Subject-Sequence": "0"}
            await self.js.publish(meta_subject, meta, headers=first)
            return key
        except APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
        try:
            old = await self._objects.get_info(key, show_deleted=True)
        except ObjectNotFoundError:
            old = None
        if old is not None and not old.deleted and old.digest == info.digest:
            await self.js.purge_stream(stream, subject=chunks)
            return key
        await self.js.publish(meta_subject, meta, headers=rollup)
        if old is not None and not old.deleted and old.nuid:  # a deleted one has no chunks
            await self.js.purge_stream(stream, subject=f"$O.{bucket}.C.{old.nuid}")
        return key

    async def get_artifact(self, key: str) -> bytes:
        """The bytes at `key`: one chunk (up to 128 KiB) is fetched by its subject; several
        stream through nats-py's get, which creates a consumer per read."""
        info = await self._objects.get_info(key)
        if info.chunks != 1 or info.is_link():
            return (await self._objects.get(key)).data
        bucket = self.names.bucket
        stored = await self.js.get_last_msg(f"OBJ_{bucket}", f"$O.{bucket}.C.{info.nuid}")
        data = stored.data or b""
        if _object_digest(data) != "SHA-256=" + (info.digest or "").partition("=")[2]:
            raise DigestMismatchError  # as nats-py's get: the "SHA-256=" prefix in any case
        return data


def _object_digest(data: bytes) -> str:
    """The digest the object store records for `data` (nats-py: SHA-256=<urlsafe base64>)."""
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
