"""/metrics and /healthz for every long-running process."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


class Health:
    """A loop calls ``beat()`` each turn; /healthz fails when it stops beating."""

    def __init__(self, stale_after: float = 60.0) -> None:
        self._last = time.monotonic()
        self._stale_after = stale_after

    def beat(self) -> None:
        self._last = time.monotonic()

    def ok(self) -> bool:
        return time.monotonic() - self._last < self._stale_after


def serve(host: str, port: int, healthy: Callable[[], bool]) -> ThreadingHTTPServer:
    """Start the server on a daemon thread; port 0 picks a free one (see server_port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = healthy()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"stalled\n", "text/plain")
            else:
                self._reply(404, b"not found: try /metrics or /healthz\n", "text/plain")

        def _reply(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("serving /metrics and /healthz on http://%s:%d", host, server.server_port)
    return server
