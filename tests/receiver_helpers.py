"""A receiver on a thread, and a plain HTTP client for it: requests go over real loopback HTTP."""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from config.settings import Settings
from herald.processes import ReceiverRun

SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SOURCES = {
    "sw": {"scheme": "standard-webhooks", "secrets": [SW_SECRET]},
    "stripe": {"scheme": "stripe", "secrets": ["whsec_stripe_test_secret"]},
    "gh": {"scheme": "github", "secrets": ["gh-old-secret", "gh-new-secret"]},
    "open": {"scheme": "none", "allow_unsigned": True, "id_header": "X-Request-Id"},
}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """One keep-alive connection (reopened if the server closed it), as a sender holds one."""

    def __init__(self, base_url: str) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Reply:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                resp = self._conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.close()
                return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        return self.request("POST", path, body, {"Content-Type": "application/json", **headers})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def receiver_settings(settings: Settings, **receiver: object) -> Settings:
    values: dict[str, object] = {
        "port": 0,
        "sources": SOURCES,
        "ack_timeout_s": 5.0,
        "shutdown_timeout_s": 5.0,
    }
    values.update(receiver)
    return settings.model_copy(
        update={"receiver": type(settings.receiver).model_validate(values), "log_level": "WARNING"}
    )


@contextmanager
def running_receiver(settings: Settings) -> Iterator[ReceiverRun]:
    """``herald receiver`` on a thread; stopped like SIGTERM on exit."""
    with ReceiverRun(settings) as run:
        thread = threading.Thread(target=run.serve, name="receiver", daemon=True)
        thread.start()
        client = Client(run.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.request("GET", "/healthz").status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "receiver did not become healthy"
            time.sleep(0.05)
        client.close()
        try:
            yield run
        finally:
            run.stop()
            thread.join(30)
            assert not thread.is_alive(), "receiver did not stop"
