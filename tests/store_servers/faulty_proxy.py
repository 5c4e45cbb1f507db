"""An HTTP proxy on 127.0.0.1 in front of the S3 server that breaks requests on purpose.

Each request is, by a seeded draw, forwarded intact or met with a fault: a dropped connection (no answer at all),
a 500 or 503 answer in S3's own error format, or a stall before forwarding. ``down=True`` answers every request
with 503, as a store that stays down. The counts of what it did are kept, so tests can show faults really happened.

``cut_downloads`` (a piece of a path) makes each GET of a matching path arrive cut off: the answer announces the
whole body but the connection closes after half of it. ``requests`` lists every request it received, in order, as
(``time.monotonic()``, method, path): what a client really sent, to count or to time.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

FAULTS = ("drop", "500", "503", "stall")
_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected by the test proxy</Message>'
    "</Error>"
)


class FaultyProxy:
    def __init__(self, upstream: str, *, fault_rate: float = 0.0, seed: int = 0, stall_seconds: float = 0.3) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.fault_rate = fault_rate
        self.down = False
        self.stall_seconds = stall_seconds
        self.counts: Counter[str] = Counter()
        self.cut_downloads: str | None = None
        self.requests: list[tuple[float, str, str]] = []
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((time.monotonic(), method, path))

    def cuts(self, method: str, path: str) -> bool:
        """Whether the answer to this request is to arrive cut off (counted when it is)."""
        if method != "GET" or not self.cut_downloads or self.cut_downloads not in path:
            return False
        with self._lock:
            self.counts["cut"] += 1
        return True

    def draw(self) -> str:
        with self._lock:
            if self.down:
                choice = "down"
            elif self._random.random() < self.fault_rate:
                choice = self._random.choice(FAULTS)
            else:
                choice = "pass"
            self.counts[choice] += 1
            return choice


def _handler_for(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # boto3 streams with checksums
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _relay(self) -> None:
            proxy.record(self.command, self.path)
            body = self._read_body()
            fault = proxy.draw()
            if fault == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if fault in ("500", "503", "down"):
                status = 500 if fault == "500" else 503
                self._answer(status, _ERROR_BODY.format(code="InternalError" if status == 500 else "SlowDown"))
                return
            if fault == "stall":
                time.sleep(proxy.stall_seconds)
            self._forward(body)

        def _answer(self, status: int, text: str) -> None:
            payload = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _forward(self, body: bytes) -> None:
            upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
            try:
                dropped = ("connection", "transfer-encoding", "content-length", "expect")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
            finally:
                upstream.close()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                    self.send_header(key, value)
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(payload)))  # a HEAD answer has no body to count
            self.end_headers()
            if response.status < 300 and len(payload) > 1 and proxy.cuts(self.command, self.path):
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    return Handler


@pytest.fixture
def faulty_proxy(moto_endpoint: str) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy(moto_endpoint).start()
    yield proxy
    proxy.stop()
