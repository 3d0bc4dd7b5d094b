"""Stream a run's output to the object store in chunks while it runs.

Keys: `logs/<run_id>/<attempt>/<chunk:06d>`, then `logs/<run_id>/<attempt>/index` (JSON:
chunks, bytes, dropped) when the run ends. RunCompleted.log_key is `logs/<run_id>/<attempt>`;
`read_log` joins the chunks back. The sandbox calls `write` from its worker thread; an asyncio
task uploads a chunk when `chunk_bytes` have gathered or every `flush_s` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

PutArtifact = Callable[[str, bytes], Awaitable[str]]
GetArtifact = Callable[[str], Awaitable[bytes]]


def log_key(run_id: str, attempt: int) -> str:
    return f"logs/{run_id}/{attempt}"


class LogStreamer:
    def __init__(
        self, put: PutArtifact, key: str, *, chunk_bytes: int, flush_s: float, max_bytes: int
    ) -> None:
        self.key = key
        self._put, self._chunk_bytes, self._flush_s, self._max_bytes = (
            put,
            chunk_bytes,
            flush_s,
            max_bytes,
        )
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._closed = False
        self.chunks = self.bytes = self.dropped = 0
        self._task = asyncio.create_task(self._pump())

    def write(self, data: bytes) -> None:
        """Thread-safe; called with each piece of output as it arrives."""
        with self._lock:
            room = self._max_bytes - self.bytes - len(self._buffer)
            if room <= 0:
                self.dropped += len(data)
                return
            self._buffer.extend(data[:room])
            self.dropped += max(0, len(data) - room)
            full = len(self._buffer) >= self._chunk_bytes
        if full:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _pump(self) -> None:
        while not self._closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_s)
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        with self._lock:
            data = bytes(self._buffer)
            self._buffer.clear()
        if not data:
            return
        try:
            await self._put(f"{self.key}/{self.chunks:06d}", data)
            self.chunks += 1
            self.bytes += len(data)
        except Exception as exc:  # a lost chunk must not fail the run; the local log has it
            self.dropped += len(data)
            log.warning("log chunk %s/%06d not stored: %r", self.key, self.chunks, exc)

    async def close(self) -> str:
        """Upload what is left and the index; returns the log key."""
        self._closed = True
        self._wake.set()
        with contextlib.suppress(Exception):
            await self._task
        await self._flush()
        index = {"chunks": self.chunks, "bytes": self.bytes, "dropped": self.dropped}
        with contextlib.suppress(Exception):
            await self._put(f"{self.key}/index", json.dumps(index).encode())
        return self.key


async def read_log(get: GetArtifact, key: str) -> bytes:
    """A run's whole stored log from its RunCompleted.log_key."""
    index = json.loads(await get(f"{key}/index"))
    parts = [await get(f"{key}/{i:06d}") for i in range(index["chunks"])]
    return b"".join(parts)
