"""A local model server for tests: speaks the OpenAI chat-completions and the Anthropic
Messages wire formats over real HTTP, serving scripted replies.

The real `openai` and `anthropic` clients reach it through their base URL
(`server.openai_base_url`, `server.anthropic_base_url`), so tests exercise the clients'
request building, response parsing and error mapping; only the remote model is fake.

    with FakeLLMServer() as server:
        server.enqueue(Reply(status=429), Reply(text="[Experiment] ... [End]", input_tokens=900))
        server.responder = lambda request: Reply(text=...)   # or compute replies from requests
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from groundloop.llm.client import LLMSettings


@dataclass
class Reply:
    text: str = ""
    input_tokens: int = 100
    output_tokens: int = 50
    status: int = 200  # non-200: an error body in the provider's format
    error: str = "scripted error"
    headers: dict[str, str] = field(default_factory=dict)
    thinking: str | None = None  # Anthropic: a thinking block before the text
    finish_reason: str = "stop"


@dataclass
class Request:
    api: str  # "openai" | "anthropic"
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def last_user_text(self) -> str:
        for message in reversed(self.body.get("messages", [])):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):  # Anthropic content blocks
                    return "".join(part.get("text", "") for part in content)
                return content or ""
        return ""

    @property
    def all_text(self) -> str:
        parts = [json.dumps(self.body.get("system", ""))]
        for message in self.body.get("messages", []):
            content = message.get("content")
            parts.append(content if isinstance(content, str) else json.dumps(content))
        return "\n".join(parts)


class FakeLLMServer:
    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.responder: Callable[[Request], Reply] | None = None
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeLLMServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/").endswith("/chat/completions"):
                    api = "openai"
                elif self.path.rstrip("/").endswith("/messages"):
                    api = "anthropic"
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                    return
                request = Request(
                    api, self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
                reply = outer._next_reply(request)
                status, payload = outer._render(api, request, reply)
                self._send(status, payload, reply.headers)

            def _send(self, status: int, payload: dict, headers: dict[str, str]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    # ------------------------------------------------------------------ scripting

    def enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    def _next_reply(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self.script:
                return self.script.popleft()
        if self.responder is not None:
            return self.responder(request)
        return Reply(status=500, error="the test scripted no reply for this request")

    def requests_for(self, api: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.api == api]

    # ------------------------------------------------------------------ wire formats

    @staticmethod
    def _render(api: str, request: Request, reply: Reply) -> tuple[int, dict]:
        model = request.body.get("model", "unknown")
        if reply.status != 200:
            if api == "openai":
                return reply.status, {
                    "error": {"message": reply.error, "type": "server_error", "code": None}
                }
            kind = {
                429: "rate_limit_error",
                529: "overloaded_error",
                401: "authentication_error",
            }.get(reply.status, "api_error")
            return reply.status, {"type": "error", "error": {"type": kind, "message": reply.error}}
        if api == "openai":
            return 200, {
                "id": f"chatcmpl-{time.monotonic_ns()}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": reply.finish_reason,
                        "message": {"role": "assistant", "content": reply.text},
                    }
                ],
                "usage": {
                    "prompt_tokens": reply.input_tokens,
                    "completion_tokens": reply.output_tokens,
                    "total_tokens": reply.input_tokens + reply.output_tokens,
                },
            }
        content: list[dict] = []
        if reply.thinking is not None:
            content.append({"type": "thinking", "thinking": reply.thinking, "signature": "sig"})
        content.append({"type": "text", "text": reply.text})
        return 200, {
            "id": f"msg_{time.monotonic_ns()}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": "end_turn" if reply.finish_reason == "stop" else reply.finish_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens},
        }


def fast_settings(server: FakeLLMServer, secret: str, **overrides: Any) -> LLMSettings:
    """Client settings that reach `server` with `secret` as both keys and back off for
    milliseconds, not seconds, so retry tests stay fast; `overrides` replace any field."""
    values: dict[str, Any] = dict(
        openai_api_key=secret,
        anthropic_api_key=secret,
        openai_base_url=server.openai_base_url,
        anthropic_base_url=server.anthropic_base_url,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        timeout_s=10,
        max_total_s=20,
    )
    values.update(overrides)
    return LLMSettings(**values)
