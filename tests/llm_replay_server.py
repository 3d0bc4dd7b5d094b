"""A local OpenAI-compatible server for tests that replays what real small models do: a model
list at /v1/models (as llama.cpp, vLLM and Ollama serve it), slow generations (a CPU-served
model), and answers recorded from such models (template echoes, Markdown ideas, whole files
with and without fences, answers cut at the token limit). Plus `refused_url()`: a URL on which
nothing listens, for the server that is down.

    with ReplayServer(models=["qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"]) as server:
        server.enqueue(Slow(Reply(text=...), seconds=2.0))
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.llm_server import FakeLLMServer, Reply, Request


@dataclass
class Slow:
    """A reply sent after `seconds` (a generation that takes that long)."""

    reply: Reply
    seconds: float


class ReplayServer(FakeLLMServer):
    def __init__(self, models: list[str] | None = None, delay_s: float = 0.0) -> None:
        super().__init__()
        self.models = models  # None: no /v1/models route (404), like some proxies
        self.delay_s = delay_s  # added to every chat reply
        self.model_list_requests = 0
        self.max_in_flight = 0
        self._in_flight = 0

    def start(self) -> ReplayServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/").endswith("/models") and outer.models is not None:
                    outer.model_list_requests += 1
                    data = [{"id": m, "object": "model", "owned_by": "me"} for m in outer.models]
                    self._send(200, {"object": "list", "data": data})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                request = Request(
                    "openai", self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
                with outer._lock:
                    outer._in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer._in_flight)
                try:
                    scripted: Any = outer._next_reply(request)
                    delay = outer.delay_s
                    if isinstance(scripted, Slow):
                        scripted, delay = scripted.reply, delay + scripted.seconds
                    time.sleep(delay)
                finally:
                    with outer._lock:
                        outer._in_flight -= 1
                status, payload = outer._render("openai", request, scripted)
                try:
                    self._send(status, payload)
                except OSError:  # the client gave up (its timeout) before the answer came
                    pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __enter__(self) -> ReplayServer:
        return self.start()


def refused_url() -> str:
    """An http://127.0.0.1:PORT/v1 on which nothing listens (the port was just freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# ------------------------------------------------------------- answers small models gave

MARKDOWN_IDEAS = """Here are three ideas to improve the score:

### Experiment 1: Cosine learning-rate decay
Replace the constant learning rate with a cosine decay so late steps take smaller steps and
settle closer to the optimum.

**Code Changes**: In `config.py`, set `SCHEDULE = "cosine"` and keep LEARNING_RATE at 1e-3.

### Experiment 2: Wider model
Doubling the width gives the model more capacity, which should lift the validation score
within the budget.

**Code Changes**:
- In `config.py`, change `WIDTH = 32` to `WIDTH = 64`.

### Experiment 3: Warmup
Enable a short learning-rate warmup so the first updates do not overshoot.

**Code Changes**: set `USE_WARMUP = True` in config.py.
"""

BOLD_LABEL_IDEAS = """1. **Experiment**: Raise the momentum to 0.9 so updates keep their direction across steps
   and the noisy gradient averages out.
   **Code Changes**: `MOMENTUM = 0.9` in config.py.

2. **Experiment:** Lower the learning rate to 3e-4 to reduce the oscillation seen late in
   training runs.
   **Code Changes:** `LEARNING_RATE = 3e-4` in config.py.
"""

IDEA_HEADERS_WITH_LABELS = """## Idea 1: Momentum sweep winner
**Experiment:** Use a momentum of 0.95, which smooths the updates more than the default.
**Code Changes:** In config.py set MOMENTUM = 0.95.

## Idea 2: Narrow and fast
**Experiment:** Halve the width to 16 so each step is cheaper and more steps fit the budget.
**Code Changes:** In config.py set WIDTH = 16.
"""
