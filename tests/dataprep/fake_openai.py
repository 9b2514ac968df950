"""A scripted OpenAI-compatible chat server on loopback, for data-preparation tests.

`FakeOpenAI(script)` serves `POST /v1/chat/completions` from a thread; `script(request)` decides
each reply (content, HTTP status, delay before answering, token usage), so a test can make a
teacher right on some problems and wrong on others, an extractor that returns malformed JSON,
500s and replies slower than the client's timeout. Every request is recorded in `requests`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass(frozen=True)
class Reply:
    content: str = ""
    status: int = 200
    delay_s: float = 0.0
    prompt_tokens: int = 10
    completion_tokens: int = 20


@dataclass(frozen=True)
class Request:
    model: str
    text: str
    """Every text part of every message, joined by newlines."""
    num_images: int
    image_urls: tuple[str, ...]
    authorization: str = ""
    """The Authorization header as received."""


class FakeOpenAI:
    """Usage: `with FakeOpenAI(script) as server: ... server.url ... server.requests`."""

    def __init__(self, script: Callable[[Request], Reply]) -> None:
        self.script = script
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _record(self, body: dict, authorization: str) -> Request:
        texts, urls = [], []
        for message in body.get("messages", []):
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            for part in parts:
                if part.get("type") == "text":
                    texts.append(part["text"])
                elif part.get("type") == "image_url":
                    urls.append(part["image_url"]["url"])
        request = Request(body.get("model", ""), "\n".join(texts), len(urls), tuple(urls), authorization)
        with self._lock:
            self.requests.append(request)
        return request


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a handler still sleeping on a slow reply must not block shutdown


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if not self.path.endswith("/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            reply = fake.script(fake._record(body, self.headers.get("Authorization", "")))
            time.sleep(reply.delay_s)
            if reply.status != 200:
                return self._send(reply.status, {"error": {"message": "scripted failure", "type": "server_error"}})
            self._send(200, _completion(body.get("model", ""), reply))

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def _completion(model: str, reply: Reply) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        },
    }
