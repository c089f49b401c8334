"""A Web Push service on loopback that does what a real one must do with each request.

It holds each subscription's private key (as the browser would), so it decrypts every
``aes128gcm`` body with it (http-ece, RFC 8291), and it verifies the VAPID ``Authorization``
(RFC 8292) with PyJWT: an ES256 signature under the key in ``k=``, ``aud`` equal to its own
origin, an ``exp`` in the future and no more than 24 hours ahead, a ``sub``. A request that
fails either is answered 400/401/403 and recorded with the reason.

The subscription's path picks a behaviour: ``/ok/<n>`` (201), ``/gone/<n>`` (410),
``/expired/<n>`` (404), ``/busy/<n>`` (429 with ``Retry-After: 2`` for the first try of each
message, then 201).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import http_ece
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes  # as sent: ciphertext
    payload: dict[str, Any] | None  # decrypted
    claims: dict[str, Any] | None  # the verified VAPID JWT's
    problem: str | None
    answered: int
    at: float


class PushPeer:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.keys: dict[str, tuple[ec.EllipticCurvePrivateKey, bytes]] = {}  # path -> (key, auth)
        self.tries: dict[tuple[str, str], int] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="push-peer", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "push peer did not start"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/{kind}/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def subscription(self, kind: str = "ok") -> str:
        """A new browser subscription at ``/<kind>/<random>``, as the JSON herald stores."""
        key = ec.generate_private_key(ec.SECP256R1())
        auth = os.urandom(16)
        path = f"/{kind}/{os.urandom(6).hex()}"
        with self.lock:
            self.keys[path] = (key, auth)
        public = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        sub = {"endpoint": self.origin + path, "keys": {"p256dh": b64url(public), "auth": b64url(auth)}}
        return json.dumps(sub, separators=(",", ":"), sort_keys=True)

    def at(self, path_prefix: str = "/") -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path.startswith(path_prefix)]

    def _verify(self, authorization: str) -> dict[str, Any]:
        scheme, _, params = authorization.partition(" ")
        if scheme.lower() != "vapid":
            raise ValueError("not a vapid Authorization")
        parts = dict(p.strip().split("=", 1) for p in params.split(","))
        point = unb64url(parts["k"])
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        claims: dict[str, Any] = jwt.decode(
            parts["t"],
            key=public,
            algorithms=["ES256"],
            audience=self.origin,
            options={"require": ["exp", "aud", "sub"]},
        )
        if claims["exp"] > time.time() + 24 * 3600:
            raise ValueError("exp more than 24 hours ahead (RFC 8292 section 2)")
        return claims

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        payload = claims = problem = None
        status = 201
        try:
            claims = self._verify(headers.get("authorization", ""))
        except (ValueError, KeyError, jwt.PyJWTError) as exc:
            problem, status = f"vapid: {exc}", 401
        with self.lock:
            keys = self.keys.get(path)
        if problem is None:
            if keys is None:
                problem, status = "unknown subscription", 404
            elif headers.get("content-encoding") != "aes128gcm" or "ttl" not in headers:
                problem, status = "missing content-encoding aes128gcm or ttl", 400
            else:
                try:
                    plain = http_ece.decrypt(
                        body, private_key=keys[0], auth_secret=keys[1], version="aes128gcm"
                    )
                    payload = json.loads(plain)
                except Exception as exc:  # noqa: BLE001 (any failure to decrypt is the test's finding)
                    problem, status = f"decrypt: {type(exc).__name__}: {exc}", 400
        extra: dict[str, str] = {}
        if problem is None and payload is not None:
            kind = path.split("/")[1]
            key = (path, str(payload.get("id")))
            with self.lock:
                self.tries[key] = self.tries.get(key, 0) + 1
                tries = self.tries[key]
            if kind == "gone":
                status = 410
            elif kind == "expired":
                status = 404
            elif kind == "busy" and tries == 1:
                status, extra = 429, {"Retry-After": "2"}
            else:
                extra = {"Location": f"{self.origin}/m/{os.urandom(4).hex()}"}
        with self.lock:
            self.received.append(Received(path, headers, body, payload, claims, problem, status, time.time()))
        return web.Response(status=status, headers=extra)
