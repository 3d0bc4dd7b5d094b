"""A sandboxed run's output: its pipe read as it comes (a tail kept, the log file appended, the
caller's callback fed), and the one place a supervising thread sleeps, on that pipe and
whatever else may end the wait (the leader's exit, a cancellation). Split from
`groundloop.execution.sandbox`.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable
from typing import BinaryIO

log = logging.getLogger("groundloop.execution.sandbox")

TAIL_BYTES = 16_384


class RunOutput:
    """The run's output pipe: kept in a tail, appended to the log, passed to the callback."""

    def __init__(
        self, fd: int, log_file: BinaryIO | None, on_output: Callable[[bytes], None] | None
    ) -> None:
        self.fd: int | None = fd
        self.log_file, self.on_output = log_file, on_output
        self.tail = bytearray()
        os.set_blocking(fd, False)

    def take(self, data: bytes) -> None:
        self.tail.extend(data)
        del self.tail[:-TAIL_BYTES]
        if self.log_file:
            self.log_file.write(data)
            self.log_file.flush()
        if self.on_output is not None:
            try:
                self.on_output(data)
            except Exception:  # a failing log sink must not kill the run
                log.exception("sandbox: on_output callback failed")

    def wait(self, timeout: float, *also: int | None) -> None:
        """Block up to `timeout` until output (taken), EOF, or one of `also` is readable."""
        poller = select.poll()
        for fd in (self.fd, *also):
            if fd is not None:
                poller.register(fd, select.POLLIN)
        ready = poller.poll(max(timeout, 0) * 1000)
        if self.fd is not None and any(fd == self.fd for fd, _ in ready):
            self._read()

    def _read(self) -> None:
        assert self.fd is not None
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        if data:
            self.take(data)
        else:  # every writer is gone
            os.close(self.fd)
            self.fd = None

    def drain(self, deadline: float) -> None:
        """What the run wrote before it ended (its processes are gone: EOF comes at once)."""
        while self.fd is not None and time.monotonic() < deadline:
            self.wait(deadline - time.monotonic())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.log_file:
            self.log_file.close()
