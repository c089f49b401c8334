"""A real webhook receiver on loopback that verifies Standard Webhooks signatures.

The signature check is written from the spec (https://www.standardwebhooks.com), not
with the library herald signs with: HMAC-SHA256 with the base64-decoded ``whsec_``
secret over ``{webhook-id}.{webhook-timestamp}.{raw body}``, base64, compared in
constant time against each ``v1,`` entry of ``webhook-signature``; timestamps more than
five minutes away are refused. A request that fails it is answered 401 and recorded.

Each path picks a behaviour, so one server plays every kind of endpoint:
``/ok``, ``/status/<code>`` (``?retry_after=<value>``), ``/flaky/<n>`` (503 for the first n
requests of each webhook-id, then 200), ``/hang`` (answers after the client gave up),
``/drop`` (closes the connection without an answer), ``/slow/<ms>`` (200 after that
long), ``/switch`` (503 while ``down`` is set, else 200: a provider outage), ``/gate`` (a
notification whose title starts with "slow" waits for ``gate_open`` or ``hang_s``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


def spec_signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300) -> str | None:
    """None when the request is signed right, else why not."""
    msg_id, ts, sig = (headers.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and ts and sig):
        return "missing headers"
    if not ts.isdigit() or abs(time.time() - int(ts)) > tolerance_s:
        return "timestamp outside tolerance"
    expected = spec_signature(secret, msg_id, ts, body)
    for entry in sig.split(" "):
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return None
    return "no matching signature"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    answered: int | None

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class WebhookPeer:
    secret: str
    server: ThreadingHTTPServer
    received: list[Received] = field(default_factory=list)
    hang_s: float = 3.0
    # Set it to answer every hanging request at once (a test's clean-up).
    hang_release: threading.Event = field(default_factory=threading.Event)
    down: threading.Event = field(default_factory=threading.Event)
    gate_open: threading.Event = field(default_factory=threading.Event)
    _tries: Counter[tuple[str, str]] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def url(self, path: str) -> str:
        return self.base + path

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def ids(self, path: str, status: int | None = 200) -> Counter[str]:
        return Counter(
            r.headers["webhook-id"] for r in self.at(path) if status is None or r.answered == status
        )

    def wait_for(
        self, path: str, count: int, timeout: float = 30.0, status: int | None = None
    ) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [r for r in self.at(path) if status is None or r.answered == status]
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"{path}: {len(self.at(path))} requests after {timeout}s, wanted {count}")

    def close(self) -> None:
        self.hang_release.set()
        self.gate_open.set()
        self.server.shutdown()
        self.server.server_close()


def start_peer(secret: str, hang_s: float = 3.0) -> WebhookPeer:
    holder: list[WebhookPeer] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            peer = holder[0]
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            parts = urlsplit(self.path)
            problem = verify(peer.secret, headers, body)
            rec = Received(parts.path, headers, body, problem is None, None)
            with peer._lock:
                peer.received.append(rec)
            if problem is not None:
                rec.answered = 401
                return self._answer(401, {"error": problem})
            segments = parts.path.strip("/").split("/")
            query = parse_qs(parts.query)
            kind = segments[0]
            if kind == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if kind == "hang":
                peer.hang_release.wait(peer.hang_s)
                rec.answered = 200
                return self._answer(200, {})
            if kind == "status":
                code = int(segments[1])
                extra = {"Retry-After": query["retry_after"][0]} if "retry_after" in query else {}
                rec.answered = code
                return self._answer(code, {}, extra)
            if kind == "slow":
                time.sleep(int(segments[1]) / 1000)
                rec.answered = 200
                return self._answer(200, {})
            if kind == "switch":
                rec.answered = 503 if peer.down.is_set() else 200
                return self._answer(rec.answered, {})
            if kind == "gate":
                if str(rec.json.get("title", "")).startswith("slow") and not peer.gate_open.is_set():
                    peer.gate_open.wait(peer.hang_s)
                rec.answered = 200
                return self._answer(200, {})
            if kind == "flaky":
                with peer._lock:
                    peer._tries[(parts.path, headers["webhook-id"])] += 1
                    n = peer._tries[(parts.path, headers["webhook-id"])]
                code = 503 if n <= int(segments[1]) else 200
                rec.answered = code
                return self._answer(code, {})
            rec.answered = 200
            self._answer(200, {"ok": True})

        def _answer(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False  # a client's idle keep-alive connection must not hold close()
    peer = WebhookPeer(secret, server, hang_s=hang_s)
    holder.append(peer)
    threading.Thread(target=server.serve_forever, daemon=True, name="webhook-peer").start()
    return peer
