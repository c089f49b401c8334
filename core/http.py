"""/metrics and /healthz for every long-running process."""

from __future__ import annotations

import errno
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.registry import CollectorRegistry

from core.errors import ConfigError

log = logging.getLogger(__name__)


class Health:
    """A loop calls ``beat()`` each turn; /healthz fails when it stops beating or has failed."""

    def __init__(self, stale_after: float = 60.0) -> None:
        self._last = time.monotonic()
        self._stale_after = stale_after
        self._failed: str | None = None

    def beat(self) -> None:
        self._last = time.monotonic()

    def fail(self, reason: str) -> None:
        """For good: the process is about to stop and must not look healthy meanwhile."""
        self._failed = reason

    def ok(self) -> bool:
        return self._failed is None and time.monotonic() - self._last < self._stale_after

    def status(self) -> str:
        """What /healthz says: ok, stalled, or why the process failed."""
        if self._failed is not None:
            return f"failed: {self._failed}"
        return "ok" if self.ok() else "stalled"


def serve(
    host: str, port: int, health: Health, registry: CollectorRegistry = REGISTRY
) -> ThreadingHTTPServer:
    """Start the server on a daemon thread; port 0 picks a free one (see server_port).

    A port that cannot be bound is a ``ConfigError`` naming the setting to change.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                body = f"{health.status()}\n".encode()
                self._reply(200 if health.ok() else 503, body, "text/plain")
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

    server = _bind(host, port, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("serving /metrics and /healthz on http://%s:%d", host, server.server_port)
    return server


def _bind(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"metrics port {port} on {host} is in use: "
                "set HERALD_METRICS_PORT to a free port, or 0 to pick one"
            ) from exc
        raise ConfigError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}: "
            "check HERALD_METRICS_HOST and HERALD_METRICS_PORT (-1 serves no metrics)"
        ) from exc
