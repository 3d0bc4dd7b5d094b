"""A run's log streamed to the object store (groundloop.runner.logs) through a real bus: the
chunks and the index read back whole, and an upload that fails costs its chunk, counted as
dropped, never the run."""

from __future__ import annotations

import json

from groundloop.bus import Bus
from groundloop.runner.logs import LogStreamer, log_key, read_log
from groundloop.settings import Settings
from tests.waiting import eventually


async def test_a_streamed_log_reads_back_and_a_lost_chunk_is_counted_not_fatal(
    settings: Settings,
):
    bus = await Bus.connect(settings, "runner-1")
    lost: list[str] = []

    async def put_losing_the_second_chunk(key: str, data: bytes) -> str:
        if key.endswith("/000001") and not lost:
            lost.append(key)
            raise ConnectionError("object store unreachable")
        return await bus.put_artifact(key, data)

    try:
        whole = LogStreamer(
            bus.put_artifact, log_key("run-a", 1), chunk_bytes=1024, flush_s=60, max_bytes=4096
        )
        lines = [f"step {line:03d} train loss 0.5\n".encode() for line in range(100)]
        assert {len(line) for line in lines} == {24}
        for line in lines[:50]:  # 1,200 bytes: a full chunk, uploaded while the run goes on
            whole.write(line)
        await eventually(lambda: whole.chunks == 1 or None, timeout=5)
        for line in lines[50:]:
            whole.write(line)
        assert await whole.close() == "logs/run-a/1"
        assert await read_log(bus.get_artifact, "logs/run-a/1") == b"".join(lines)
        index = json.loads(await bus.get_artifact("logs/run-a/1/index"))
        assert index == {"chunks": 2, "bytes": 2400, "dropped": 0}

        lossy = LogStreamer(
            put_losing_the_second_chunk,
            log_key("run-b", 2),
            chunk_bytes=1024,
            flush_s=60,
            max_bytes=1 << 20,
        )
        lossy.write(b"a" * 1024)
        await eventually(lambda: lossy.chunks == 1 or None, timeout=5)
        lossy.write(b"b" * 1024)  # its upload fails
        await eventually(lambda: lost or None, timeout=5)
        lossy.write(b"c" * 10)
        await lossy.close()
        index = json.loads(await bus.get_artifact("logs/run-b/2/index"))
        assert index == {"chunks": 2, "bytes": 1034, "dropped": 1024}
        assert await read_log(bus.get_artifact, "logs/run-b/2") == b"a" * 1024 + b"c" * 10
    finally:
        await bus.close()
