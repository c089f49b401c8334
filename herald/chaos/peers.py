"""``herald chaos``'s provider peers: a webhook receiver, a Web Push service and an SMTP server on
127.0.0.1 whose faults the run switches at any time.

A chaos run proves delivery under outages, so its peers must speak the real protocols (a
signature herald got wrong is a 401, not a pass) and must fail the ways real providers fail:

- ``ok``: verify and accept (webhook 200, push 201, SMTP 250), and record the acceptance;
- ``down``: the port refuses connections: the listening socket is closed and every open
  connection reset (a kept-alive client finds out on its next request); any other mode listens
  again on the same port;
- ``error``: a transient answer (HTTP 503, SMTP ``451``); ``throttle``: HTTP 429 with
  ``Retry-After: 1``, SMTP ``450``; nothing recorded;
- ``slow``: wait ``slow_ms``, then answer by the mode at that moment (``slow`` itself as ``ok``).

A request is judged by the mode when it is answered. ``POST /reject/<user>`` on the webhook port
is an endpoint that refuses for good: 422 whenever the port is up, whatever the mode.

Every acceptance (provider, delivery id, user, kind, and the time the 2xx/250 went out) is kept
in a list in memory, which the run reads incrementally from the control port
(``/accepted?since=N``) and checks against the database: each delivery herald calls sent must
have been accepted, and at most once.

All of it is one child process (``python -m herald.chaos.peers``) on one event loop, so the
peers' CPU does not skew the driver's timing; ``Peers`` starts it and drives it. The HTTP
servers are a small asyncio HTTP/1.1 server written here (Content-Length or chunked bodies,
keep-alive), because ``down`` must close and reopen the listening socket and reset the open
connections, which uvicorn cannot do. Secrets reach the child through its environment
(``HERALD_CHAOS_WEBHOOK_SECRET``, ``HERALD_CHAOS_PUSH_KEY``, ``HERALD_CHAOS_PUSH_AUTH``),
never its command line.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from channels.push import b64url, unb64url
from core.errors import HeraldError
from core.webhooks import new_secret

HOST = "127.0.0.1"
PROVIDERS = ("webhook", "push", "email")
MODES = ("ok", "down", "error", "throttle", "slow")
DEFAULT_SLOW_MS = 800
COUNTERS = ("accepted", "bad_signatures", "rejected", "refused", "refused_by_mode", "slowed", "reset")
START_TIMEOUT_S = 30.0
MAX_BODY = 1 << 20  # a webhook body or a push message is a few kB

SECRET_ENV = "HERALD_CHAOS_WEBHOOK_SECRET"  # noqa: S105 (a variable's name, not a secret)
PUSH_KEY_ENV = "HERALD_CHAOS_PUSH_KEY"  # the subscription's P-256 private key, PKCS#8 PEM
PUSH_AUTH_ENV = "HERALD_CHAOS_PUSH_AUTH"  # the subscription's 16-byte auth secret, base64url

Acceptance = dict[str, Any]


# -- the child: a small HTTP/1.1 server --------------------------------------------------------


class BadRequest(Exception):
    """The bytes on the connection are not a request this server reads."""


@dataclass
class Request:
    method: str
    path: str  # without the query, percent-encoded as sent
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes
    # False once the connection is closed (reset by `down` while a slow answer waited).
    open: Callable[[], bool] = lambda: True


@dataclass
class Reply:
    status: int
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    # Called just before the answer is written (an acceptance is stamped and recorded then),
    # and only when the connection is still open.
    on_answer: Callable[[], None] | None = None


# None: close the connection without an answer (the port went down meanwhile).
Handler = Callable[[Request], Awaitable[Reply | None]]


def json_reply(status: int, value: Any) -> Reply:
    return Reply(status, json.dumps(value, separators=(",", ":")).encode())


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on a connection, or None when the client closed it between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest("the connection closed inside a request's head") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest("the request's head is too long") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"not an HTTP/1.x request line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest(f"not a header line: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
    body = await read_body(reader, headers)
    path, _, query = parts[1].partition("?")
    return Request(parts[0], path, dict(urllib.parse.parse_qsl(query)), headers, body)


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()).strip():  # the trailers, up to the empty line
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readline()
            if sum(map(len, chunks)) > MAX_BODY:
                raise BadRequest("the body is too long")
    length = int(headers.get("content-length", "0") or "0")
    if not 0 <= length <= MAX_BODY:
        raise BadRequest(f"a Content-Length of {length}")
    return await reader.readexactly(length)


def encode_reply(reply: Reply, keep_alive: bool) -> bytes:
    headers = {"content-type": "application/json", **reply.headers}
    headers["content-length"] = str(len(reply.body))
    headers["connection"] = "keep-alive" if keep_alive else "close"
    head = f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode("latin-1") + reply.body


async def serve_http(handler: Handler, port: int, connections: set[asyncio.Transport]) -> asyncio.Server:
    """Listen on ``port`` with ``handler`` answering each request; open connections are kept in
    ``connections`` (so ``down`` can reset them)."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        connections.add(transport)
        try:
            await converse(handler, reader, writer)
        except (BadRequest, ValueError, asyncio.IncompleteReadError) as exc:
            with contextlib.suppress(ConnectionError):
                writer.write(encode_reply(json_reply(400, {"error": str(exc)[:200]}), keep_alive=False))
        except (ConnectionError, asyncio.CancelledError):
            # CancelledError: the loop is stopping (SIGTERM). Ending quietly keeps Python 3.11's
            # stream callback from printing a traceback for every open connection.
            pass
        finally:
            connections.discard(transport)
            transport.close()

    return await asyncio.start_server(connection, HOST, port, reuse_address=True, backlog=1024)


async def converse(handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer requests on one connection until either side closes it."""
    while True:
        request = await read_request(reader)
        if request is None:
            return
        request.open = lambda: not writer.transport.is_closing()
        reply = await handler(request)
        if reply is None or writer.transport.is_closing():
            return  # reset by `down` while the answer was pending: nothing was answered
        if reply.on_answer is not None:
            reply.on_answer()
        keep_alive = request.headers.get("connection", "").lower() != "close"
        writer.write(encode_reply(reply, keep_alive))
        await writer.drain()
        if not keep_alive:
            return


def reset(transport: asyncio.Transport) -> None:
    """Close a connection with a TCP reset (SO_LINGER 0), as a crashed provider's host would."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# -- the child: the peers -----------------------------------------------------------------------


class Peer(abc.ABC):
    """One provider's port: its mode, its counters, its listening socket and open connections."""

    def __init__(self, name: str, port: int, record: Callable[[Acceptance], None]) -> None:
        self.name = name
        self.port = port
        self.mode = "ok"
        self.slow_ms = DEFAULT_SLOW_MS
        self.counts: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.Transport] = set()  # HTTP
        self.protocols: weakref.WeakSet[Any] = weakref.WeakSet()  # SMTP: aiosmtpd's protocols
        self._record = record

    @abc.abstractmethod
    async def listen(self) -> None:
        """Open the port (again, after ``down``)."""

    def drop(self) -> None:
        """``down``: stop listening and reset every open connection."""
        if self.server is not None:
            self.server.close()
            self.server = None
        open_ = list(self.connections) + [p.transport for p in self.protocols if p.transport is not None]
        for transport in open_:
            if not transport.is_closing():
                self.counts["reset"] += 1
                reset(transport)
        self.connections.clear()

    async def settle(self) -> str:
        """The mode this answer follows: in ``slow``, the mode after the wait (``slow`` as ``ok``)."""
        if self.mode != "slow":
            return self.mode
        self.counts["slowed"] += 1
        await asyncio.sleep(self.slow_ms / 1000)
        return "ok" if self.mode == "slow" else self.mode

    def accept(self, delivery_id: str, user: str, kind: str) -> None:
        """Record an acceptance now: call it as the 2xx/250 is about to be written."""
        self.counts["accepted"] += 1
        at = time.time()
        self._record({"provider": self.name, "id": delivery_id, "user": user, "kind": kind, "at": at})

    def accepting(self, delivery_id: str, user: str, kind: str) -> Callable[[], None]:
        return lambda: self.accept(delivery_id, user, kind)

    def transient(self, mode: str) -> Reply | None:
        """The HTTP answer of a mode that refuses (None: ``down``, close without one)."""
        if mode == "down":
            return None  # (the connection was reset: nobody is waiting for an answer)
        self.counts["refused_by_mode"] += 1
        if mode == "throttle":
            return Reply(429, b'{"error":"slow down"}', {"retry-after": "1"})
        return Reply(503, b'{"error":"try again later"}')

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "mode": self.mode, "slow_ms": self.slow_ms}


def split_path(path: str) -> tuple[str, str]:
    """``/hook/<user>`` -> ("hook", user), the user percent-decoded."""
    first, _, rest = path.removeprefix("/").partition("/")
    return first, urllib.parse.unquote(rest)


class WebhookPeer(Peer):
    """``POST /hook/<user>``: a Standard Webhooks receiver; ``POST /reject/<user>``: always 422."""

    def __init__(self, port: int, record: Callable[[Acceptance], None], secret: str) -> None:
        super().__init__("webhook", port, record)
        self._key = base64.b64decode(secret.removeprefix("whsec_"))

    async def listen(self) -> None:
        self.server = await serve_http(self.answer, self.port, self.connections)

    def verified(self, headers: dict[str, str], body: bytes) -> bool:
        msg_id = headers.get("webhook-id", "")
        ts = headers.get("webhook-timestamp", "")
        mac = hmac.new(self._key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        expected = base64.b64encode(mac).decode()
        for entry in headers.get("webhook-signature", "").split(" "):
            version, _, value = entry.partition(",")
            if version == "v1" and hmac.compare_digest(value, expected):
                return True
        return False

    async def answer(self, request: Request) -> Reply | None:
        kind, user = split_path(request.path)
        if request.method != "POST" or kind not in ("hook", "reject") or not user:
            return json_reply(404, {"error": "POST /hook/<user> or /reject/<user>"})
        if kind == "reject":
            self.counts["rejected"] += 1
            return json_reply(422, {"error": "this endpoint refuses every delivery"})
        mode = await self.settle()
        if not request.open():
            return None  # reset by `down` during a slow wait: not answered, not counted
        if mode != "ok":
            return self.transient(mode)
        if not self.verified(request.headers, request.body):
            self.counts["bad_signatures"] += 1
            return json_reply(401, {"error": "bad signature"})
        try:
            body_type = json.loads(request.body).get("type")
        except (ValueError, AttributeError):
            body_type = None
        delivery_id = request.headers["webhook-id"]
        return Reply(200, on_answer=self.accepting(delivery_id, user, str(body_type or "")))


class PushPeer(Peer):
    """``POST /push/<user>``: a Web Push service holding the subscription's private key: it
    checks the VAPID signature (py-vapid) and decrypts the message (http-ece, aes128gcm)."""

    def __init__(
        self, port: int, record: Callable[[Acceptance], None], key: ec.EllipticCurvePrivateKey, auth: bytes
    ) -> None:
        super().__init__("push", port, record)
        self._key = key
        self._auth = auth

    async def listen(self) -> None:
        self.server = await serve_http(self.answer, self.port, self.connections)

    def opened(self, request: Request) -> dict[str, Any] | None:
        """The decrypted message, or None when the signature or the encryption is wrong."""
        import http_ece
        from py_vapid import Vapid02

        try:
            if not Vapid02.verify(request.headers.get("authorization", "")):
                return None
            plain = http_ece.decrypt(
                request.body, private_key=self._key, auth_secret=self._auth, version="aes128gcm"
            )
            message = json.loads(plain)
        except Exception:  # noqa: BLE001 (whatever fails, the push service refuses the message)
            return None
        return message if isinstance(message, dict) and message.get("id") else None

    async def answer(self, request: Request) -> Reply | None:
        kind, user = split_path(request.path)
        if request.method != "POST" or kind != "push" or not user:
            return json_reply(404, {"error": "POST /push/<user>"})
        mode = await self.settle()
        if not request.open():
            return None  # reset by `down` during a slow wait: not answered, not counted
        if mode != "ok":
            return self.transient(mode)
        message = self.opened(request)
        if message is None:
            self.counts["refused"] += 1
            return json_reply(400, {"error": "bad VAPID signature or undecryptable message"})
        accept = self.accepting(str(message["id"]), user, str(message.get("type") or ""))
        return Reply(201, b"", on_answer=accept)


_MESSAGE_ID = re.compile(rb"(?im)^Message-ID:\s*<([^@>\r\n]+)@[^>\r\n]*>")


class MailPeer(Peer):
    """An SMTP server (aiosmtpd): on DATA, records the ``Message-ID``'s delivery id."""

    async def listen(self) -> None:
        from aiosmtpd.smtp import SMTP

        def protocol() -> Any:
            # A fixed host name: aiosmtpd would otherwise look up this host's FQDN per connection.
            made = SMTP(self, hostname="peers.chaos.invalid")
            self.protocols.add(made)
            return made

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(protocol, HOST, self.port, reuse_address=True, backlog=1024)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        mode = await self.settle()
        if server.transport is None or server.transport.is_closing() or mode == "down":
            return "421 4.3.0 closing"  # reset by `down` meanwhile: nobody reads it
        if mode in ("error", "throttle"):
            self.counts["refused_by_mode"] += 1
            return "451 4.3.0 try again later" if mode == "error" else "450 4.7.1 slow down"
        # The header block only, by hand: herald writes ``<delivery id@sender's domain>``.
        head = bytes(envelope.original_content or b"").split(b"\r\n\r\n", 1)[0]
        found = _MESSAGE_ID.search(head)
        if found is None:
            self.counts["refused"] += 1
            return "554 5.6.0 no Message-ID"
        user = str(envelope.rcpt_tos[0]).rsplit("@", 1)[0] if envelope.rcpt_tos else ""
        self.accept(found.group(1).decode(), user, "")
        return "250 2.0.0 queued"


class Site:
    """Everything the child serves: the three peers and the control port."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str]) -> None:
        self.accepted: list[Acceptance] = []
        record = self.accepted.append
        key = serialization.load_pem_private_key(env[PUSH_KEY_ENV].encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SystemExit(f"{PUSH_KEY_ENV} is not an EC private key")
        self.peers: dict[str, Peer] = {
            "webhook": WebhookPeer(args.webhook_port, record, env[SECRET_ENV]),
            "push": PushPeer(args.push_port, record, key, unb64url(env[PUSH_AUTH_ENV])),
            "email": MailPeer("email", args.smtp_port, record),
        }
        self.control_port: int = args.control_port
        self._control_connections: set[asyncio.Transport] = set()

    async def start(self) -> asyncio.Server:
        for peer in self.peers.values():
            await peer.listen()
        return await serve_http(self.control, self.control_port, self._control_connections)

    def close(self) -> None:
        for peer in self.peers.values():
            peer.drop()

    async def set_mode(self, provider: str, mode: str, slow_ms: int) -> None:
        peer = self.peers[provider]
        peer.slow_ms = slow_ms
        if mode == "down":
            peer.mode = "down"
            peer.drop()
            return
        if peer.server is None:
            await peer.listen()  # before the mode changes: a failed listen leaves it down
        peer.mode = mode

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: peer.stats() for name, peer in self.peers.items()}
        out["modes"] = {name: peer.mode for name, peer in self.peers.items()}
        return out

    async def control(self, request: Request) -> Reply:
        route = (request.method, request.path)
        if route == ("GET", "/health"):
            return json_reply(200, {"ok": True})
        if route == ("GET", "/stats"):
            return json_reply(200, self.stats())
        if route == ("GET", "/accepted"):
            since = max(0, int(request.query.get("since", "0")))
            return json_reply(200, {"items": self.accepted[since:], "next": len(self.accepted)})
        if route == ("POST", "/mode"):
            return await self.mode_request(request.body)
        return json_reply(404, {"error": "GET /health, /stats, /accepted?since=N; POST /mode"})

    async def mode_request(self, body: bytes) -> Reply:
        try:
            asked = json.loads(body)
            provider, mode = asked["provider"], asked["mode"]
            slow_ms = int(asked.get("slow_ms", DEFAULT_SLOW_MS))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return json_reply(400, {"error": f"want JSON {{provider, mode, slow_ms?}}: {exc}"})
        if provider not in PROVIDERS or mode not in MODES or slow_ms < 0:
            return json_reply(400, {"error": f"provider in {PROVIDERS}, mode in {MODES}, slow_ms >= 0"})
        try:
            await self.set_mode(provider, mode, slow_ms)
        except OSError as exc:
            return json_reply(500, {"error": f"cannot listen on {provider}'s port again: {exc}"})
        return json_reply(200, {"modes": self.stats()["modes"]})


async def serve(args: argparse.Namespace) -> None:
    site = Site(args, dict(os.environ))
    control = await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    ports = ", ".join(f"{name} {peer.port}" for name, peer in site.peers.items())
    print(f"herald chaos peers: {ports}, control {args.control_port}", flush=True)
    await stop.wait()
    control.close()
    site.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m herald.chaos.peers",
        description=(
            "herald chaos's provider peers on 127.0.0.1: a Standard Webhooks receiver, a Web Push "
            "service and an SMTP server, whose faults (ok, down, error, throttle, slow) are switched "
            "over the control port. Secrets come from the environment: "
            f"{SECRET_ENV} (whsec_...), {PUSH_KEY_ENV} (the subscription's P-256 private key, "
            f"PKCS#8 PEM) and {PUSH_AUTH_ENV} (its 16-byte auth secret, base64url)."
        ),
        epilog=(
            "Control: GET /health; POST /mode {provider, mode, slow_ms?}; "
            "GET /accepted?since=N -> {items, next}; GET /stats. SIGTERM exits 0."
        ),
    )
    parser.add_argument("--control-port", type=int, required=True, help="HTTP control port (always up)")
    parser.add_argument("--webhook-port", type=int, required=True, help="POST /hook/<user>, /reject/<user>")
    parser.add_argument("--push-port", type=int, required=True, help="POST /push/<user>")
    parser.add_argument("--smtp-port", type=int, required=True, help="plain SMTP, no TLS, no AUTH")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    missing = [name for name in (SECRET_ENV, PUSH_KEY_ENV, PUSH_AUTH_ENV) if not os.environ.get(name)]
    if missing:
        raise SystemExit(f"herald chaos peers: set {', '.join(missing)} in the environment")
    asyncio.run(serve(args))


# -- the driver side ----------------------------------------------------------------------------


class Peers:
    """The peers' child process, seen from the chaos run: the addresses to give herald, the
    modes to switch, and what the peers accepted."""

    def __init__(self, folder: Path) -> None:
        from herald.embedded import free_port  # the driver's only: the child never imports it

        self.folder = folder
        self.log_path = folder / "peers.log"
        self.webhook_secret: str = new_secret()
        self._push_key = ec.generate_private_key(ec.SECP256R1())
        self._push_auth = os.urandom(16)
        self.control_port: int = free_port()
        self.webhook_port: int = free_port()
        self.push_port: int = free_port()
        self.smtp_port: int = free_port()
        self._control = f"http://{HOST}:{self.control_port}"
        self._accepted: list[Acceptance] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> Peers:
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-P", "-m", "herald.chaos.peers", "--control-port", str(self.control_port)]
        argv += ["--webhook-port", str(self.webhook_port), "--push-port", str(self.push_port)]
        argv += ["--smtp-port", str(self.smtp_port)]
        pem = self._push_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        env = {
            **os.environ,
            SECRET_ENV: self.webhook_secret,
            PUSH_KEY_ENV: pem.decode(),
            PUSH_AUTH_ENV: b64url(self._push_auth),
        }
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                self._get("/health", timeout=2)
                return
            except (OSError, HeraldError):
                if self._proc.poll() is not None:
                    raise HeraldError(
                        f"the chaos peers exited with {self._proc.returncode} at start; see {self.log_path}"
                    ) from None
                if time.monotonic() > deadline:
                    raise HeraldError(
                        f"the chaos peers did not answer /health in {START_TIMEOUT_S:.0f} s; "
                        f"see {self.log_path}"
                    ) from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def webhook_url(self, user: str) -> str:
        return f"http://{HOST}:{self.webhook_port}/hook/{urllib.parse.quote(user, safe='')}"

    def reject_url(self, user: str) -> str:
        return f"http://{HOST}:{self.webhook_port}/reject/{urllib.parse.quote(user, safe='')}"

    def push_subscription(self, user: str) -> str:
        """The browser's ``PushSubscription`` JSON for ``user`` (a push endpoint's address)."""
        point = self._push_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        endpoint = f"http://{HOST}:{self.push_port}/push/{urllib.parse.quote(user, safe='')}"
        keys = {"p256dh": b64url(point), "auth": b64url(self._push_auth)}
        return json.dumps({"endpoint": endpoint, "keys": keys}, sort_keys=True)

    def set_mode(self, provider: str, mode: str, slow_ms: int = DEFAULT_SLOW_MS) -> None:
        body = {"provider": provider, "mode": mode, "slow_ms": slow_ms}
        self._call("/mode", json.dumps(body).encode())

    def accepted(self) -> list[Acceptance]:
        """Every acceptance so far, in the order the peers answered (fetched incrementally)."""
        got = self._get(f"/accepted?since={len(self._accepted)}")
        self._accepted.extend(got["items"])
        return list(self._accepted)

    def stats(self) -> dict[str, Any]:
        return self._get("/stats")

    def _get(self, path: str, timeout: float = 30) -> dict[str, Any]:
        return self._call(path, None, timeout)

    def _call(self, path: str, body: bytes | None, timeout: float = 30) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 (loopback, a URL made here)
            self._control + path, data=body, headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (loopback)
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            raise HeraldError(f"chaos peers: {path} answered {exc.code}: {exc.read()[:300]!r}") from None


if __name__ == "__main__":
    main()
