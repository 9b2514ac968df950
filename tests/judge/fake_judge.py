"""A controllable fake judge LLM on loopback for fault tests: an OpenAI-compatible chat endpoint
whose behaviour a test switches at run time.

Modes: `ok` (answers with `reply(messages)`, by default the lexical judge), `stall` (sleeps `stall_s`
before answering), `garbage` (200 with an HTML body), `error` (HTTP `status`, 500 by default), `empty` (200, a completion
whose content has no verdict tags). `stop()` closes the socket, so connections are refused, and
`start()` serves again on the same port.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from judge.lexical import lexical_reply


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024


class FakeJudge:
    def __init__(self, *, reply: Callable[[list], str] = lexical_reply, port: int = 0) -> None:
        self.reply, self.port = reply, port
        self.mode, self.stall_s, self.status = "ok", 30.0, 500
        self.num_requests = 0
        self.authorization = ""
        """The Authorization header of the last request."""
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeJudge:
        self._server = _Server(("127.0.0.1", self.port), _handler(self))
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _count(self) -> None:
        with self._lock:
            self.num_requests += 1


def _handler(fake: FakeJudge):
    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            fake._count()
            fake.authorization = self.headers.get("authorization", "")
            mode = fake.mode
            if mode == "stall":
                time.sleep(fake.stall_s)
            if mode == "error":
                return self._send(fake.status, b'{"error": {"message": "boom"}}', "application/json")
            if mode == "garbage":
                return self._send(200, b"<html>502 upstream gateway</html>", "text/html")
            content = "I cannot tell." if mode == "empty" else fake.reply(body["messages"])
            completion = {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": content}}]}
            self._send(200, json.dumps(completion).encode(), "application/json")

        def _send(self, status: int, data: bytes, content_type: str) -> None:
            try:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout) before the answer

    return Handler
