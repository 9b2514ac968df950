"""A scripted OpenAI-compatible chat server on loopback for evaluation tests: `script(model, messages)`
returns each reply's content; every request is recorded (model, joined text, image URLs)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest


@dataclass(frozen=True)
class Seen:
    model: str
    system: str
    user: str
    image_urls: tuple[str, ...]
    max_tokens: int | None
    temperature: float | None


class FakeChatServer:
    def __init__(self, script: Callable[[Seen], str]) -> None:
        self.script = script
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def count(self, model: str) -> int:
        return sum(r.model == model for r in self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reply(self, body: dict) -> str:
        texts = {"system": [], "user": []}
        urls = []
        for message in body["messages"]:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    texts[message["role"]].append(part["text"])
                else:
                    urls.append(part["image_url"]["url"])
        seen = Seen(body["model"], "\n".join(texts["system"]), "\n".join(texts["user"]), tuple(urls),
                    body.get("max_tokens"), body.get("temperature"))
        with self._lock:
            self.requests.append(seen)
        return self.script(seen)


def _handler(fake: FakeChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = fake.reply(body)
            payload = json.dumps({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def fake_chat_server():
    servers = []

    def start(script: Callable[[Seen], str]) -> FakeChatServer:
        servers.append(FakeChatServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
