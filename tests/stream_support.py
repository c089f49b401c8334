"""A Server-Sent Events client for the stream tests: reads on a thread, timestamps every event."""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.api_support import bearer


@dataclass
class Event:
    event: str
    data: str
    id: str | None
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.data)


def stream_token(base: str, user: str) -> str:
    r = httpx.post(f"{base}/v1/stream/token", headers=bearer(user), timeout=10)
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


class SseClient:
    """``GET /v1/stream`` on a thread. ``events`` holds each event as it was parsed (comments
    as event ``comment``); ``last_id`` is what EventSource would send as Last-Event-ID."""

    def __init__(self, base: str, user: str, last_event_id: str | None = None) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.last_id: str | None = last_event_id
        self.status: int | None = None
        self.connected = threading.Event()
        self.ended = threading.Event()
        url = urllib.parse.urlsplit(base)
        # http.client, not httpx: close() can shut the socket under a blocked read at once.
        self._conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
        query = urllib.parse.urlencode({"token": stream_token(base, user)})
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self._conn.request("GET", f"/v1/stream?{query}", headers=headers)
        self._thread = threading.Thread(target=self._run, name="sse", daemon=True)
        self._thread.start()
        assert self.connected.wait(10), "the stream did not answer in 10 s"

    def _run(self) -> None:
        try:
            response = self._conn.getresponse()
            self.status = response.status
            self.connected.set()
            if self._conn.sock is not None:
                self._conn.sock.settimeout(None)
            kind, data, eid = "message", [], None
            while raw := response.readline():
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    self.events.put(Event("comment", line[1:].strip(), None))
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line.startswith("id:"):
                    eid = line[3:].strip()
                elif line == "":
                    if data:
                        if eid is not None:
                            self.last_id = eid
                        self.events.put(Event(kind, "\n".join(data), eid))
                    kind, data, eid = "message", [], None
        except (OSError, http.client.HTTPException, ValueError):
            pass  # closed by close(), or by the server
        finally:
            self.connected.set()
            self.ended.set()

    def next(self, event: str, timeout: float = 5.0) -> Event:
        """The next event of this kind (others before it are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                got = self.events.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(f"no {event!r} event within {timeout} s") from None
            if got.event == event:
                return got

    def take(self, until: str = "unread", timeout: float = 5.0) -> list[Event]:
        """Every event up to and including the next ``until`` event."""
        out: list[Event] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self.events.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(f"no {until!r} event within {timeout} s; got {out}") from None
            out.append(got)
            if got.event == until:
                return out

    def close(self) -> None:
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        assert not self._thread.is_alive(), "the stream reader did not stop"
        self._conn.close()

    def __enter__(self) -> SseClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
