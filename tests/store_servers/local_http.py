"""The lifetime every local HTTP stand-in shares (OCI's and W&B's, which have no emulator to start): a threaded
server on a free port of 127.0.0.1 whose request handler reaches the stand-in's state through ``server.stand_in``."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalHTTPStandIn:
    """Serves ``handler`` on 127.0.0.1 (a free port) from a daemon thread, between :meth:`start` and :meth:`stop`."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], name: str) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.stand_in = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
