"""Web Push: one encrypted POST per subscription (RFC 8030, 8291, 8292).

A subscription (a ``channel_endpoints`` row) is the browser's ``PushSubscription`` as JSON:
``{"endpoint": "https://push.example/...", "keys": {"p256dh": ..., "auth": ...}}``. The
payload (title, summary, url and ids: nothing else leaves) is encrypted for that
subscription as ``aes128gcm`` by http-ece, with a fresh ephemeral key and salt per message;
the request carries a VAPID JWT (``aud`` = the push service's origin, ``exp`` 12 hours
ahead, ``sub`` = ``HERALD_PUSH__VAPID_SUBJECT``) signed ES256 by py-vapid, one per origin,
reused until an hour before it expires.

Answers: 2xx accepted; 404 and 410 mean the subscription is gone (the deliverer disables
it); 429 and 5xx are transient (``Retry-After`` is honoured); any other 4xx is permanent.
Requests go through the SSRF-guarded pool: push endpoints are public https URLs, unless
``HERALD_PUSH__ALLOW_PRIVATE_TARGETS`` allows loopback (and plain http there).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import http_ece
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02
from yarl import URL

from channels.base import Endpoint, SendResult
from channels.net import GuardedPoster
from channels.webhook import absolute_url, classify
from config.settings import Settings
from core.errors import ConfigError

# A VAPID token lives this long; a new one is signed when less than REFRESH_S remains.
TOKEN_TTL_S = 12 * 3600
REFRESH_S = 3600
# RFC 8291: a push message's plaintext must fit one 4096-byte record with its padding.
MAX_PAYLOAD = 3993


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def generate_keys() -> tuple[str, str]:
    """A new VAPID key pair: (private key, public key), both base64url. The private key is the
    raw 32-byte scalar (HERALD_PUSH__VAPID_PRIVATE_KEY); the public key is the uncompressed
    point the web app passes to ``pushManager.subscribe({applicationServerKey})``."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_numbers().private_value.to_bytes(32, "big")
    public = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return b64url(private), b64url(public)


def load_vapid(private_key: str) -> Vapid02:
    """The key from settings (raw base64url, or DER base64url); ConfigError when unusable."""
    try:
        return Vapid02.from_string(private_key.strip())
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ConfigError(
            f"HERALD_PUSH__VAPID_PRIVATE_KEY is not a P-256 private key ({type(exc).__name__}): "
            "`herald vapid generate` makes one"
        ) from None


def public_key(vapid: Vapid02) -> str:
    raw = vapid.public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return b64url(raw)


def push_payload(delivery: dict[str, Any], app_url: str | None) -> dict[str, Any]:
    """What the service worker gets: title, summary, url and ids (DESIGN.md's list, no more)."""
    body: dict[str, Any] = {
        "type": "digest" if delivery.get("type") == "digest" else "notification",
        "id": delivery["delivery_id"],
        "notification_id": delivery.get("notification_id"),
        "title": delivery["title"],
        "summary": delivery.get("summary"),
        "url": absolute_url(delivery.get("target_url"), app_url),
        "severity": delivery.get("severity"),
    }
    if body["type"] == "digest":
        body["count"] = delivery.get("count")
    return body


class Subscription:
    """A parsed ``PushSubscription``; ValueError when it is not one."""

    def __init__(self, raw: str) -> None:
        sub = json.loads(raw)
        if not isinstance(sub, dict) or not isinstance(sub.get("endpoint"), str):
            raise ValueError("no endpoint")
        keys = sub.get("keys")
        if not isinstance(keys, dict):
            raise ValueError("no keys")
        self.endpoint: str = sub["endpoint"]
        self.p256dh = unb64url(str(keys["p256dh"]))
        self.auth = unb64url(str(keys["auth"]))
        if len(self.p256dh) != 65 or len(self.auth) != 16:
            raise ValueError("p256dh must be a 65-byte P-256 point and auth 16 bytes")


def encrypt(payload: bytes, sub: Subscription) -> bytes:
    """RFC 8291's aes128gcm body: a fresh ephemeral key and salt per message."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    return bytes(
        http_ece.encrypt(
            payload,
            salt=os.urandom(16),
            private_key=ephemeral,
            dh=sub.p256dh,
            auth_secret=sub.auth,
            version="aes128gcm",
        )
    )


def classify_push(code: int, headers: Mapping[str, str]) -> SendResult:
    """A push service's answer: as a webhook's, but 404 also means the subscription is gone."""
    if code == 404:
        return SendResult("gone", code, error="404: the push subscription expired")
    result = classify(code, headers)
    if result.outcome == "gone":
        return SendResult("gone", code, error="410: the push subscription is gone")
    if result.outcome == "ok":
        # The push service's message URL (Location) names the message, when it gives one.
        return SendResult("ok", code, provider_message_id=headers.get("location"))
    return result


class PushProvider:
    channel = "push"

    def __init__(self, settings: Settings) -> None:
        push = settings.push
        if push.vapid_private_key is None or not push.vapid_subject:
            raise ConfigError(
                "the push channel needs VAPID: set HERALD_PUSH__VAPID_PRIVATE_KEY and "
                "HERALD_PUSH__VAPID_SUBJECT (`herald vapid generate` makes a key pair)"
            )
        self._vapid = load_vapid(push.vapid_private_key.get_secret_value())
        self._subject = push.vapid_subject
        self._ttl = str(push.ttl_s)
        self._app_url = settings.app_url
        self._tokens: dict[str, tuple[str, float]] = {}  # origin -> (Authorization, expires)
        self._http = GuardedPoster(
            push.allow_private_targets, connections=settings.delivery.concurrency, timeout_s=push.timeout_s
        )

    def authorization(self, origin: str) -> str:
        """``vapid t=<JWT>,k=<public key>`` for ``origin``, signed once per origin and period."""
        now = time.time()
        cached = self._tokens.get(origin)
        if cached is not None and cached[1] - now > REFRESH_S:
            return cached[0]
        exp = int(now) + TOKEN_TTL_S
        header = self._vapid.sign({"aud": origin, "exp": exp, "sub": self._subject})["Authorization"]
        self._tokens[origin] = (header, float(exp))
        return str(header)

    def target(self, endpoint: Endpoint) -> str:
        try:
            url = URL(Subscription(endpoint.address).endpoint)
            return f"{url.host or ''}:{url.port or ''}"
        except (ValueError, KeyError, TypeError):  # send() says why, as a permanent failure
            return "unreadable-subscription"

    async def send(self, endpoint: Endpoint, delivery: dict[str, Any]) -> SendResult:
        try:
            sub = Subscription(endpoint.address)
            url = URL(sub.endpoint)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            return SendResult("permanent", error=f"not a usable push subscription: {exc}"[:300])
        plain = json.dumps(push_payload(delivery, self._app_url), separators=(",", ":")).encode()
        if len(plain) > MAX_PAYLOAD:
            return SendResult("permanent", error=f"payload of {len(plain)} bytes exceeds {MAX_PAYLOAD}")
        headers = {
            "authorization": self.authorization(f"{url.scheme}://{url.raw_authority}"),
            "content-encoding": "aes128gcm",
            "content-type": "application/octet-stream",
            "ttl": self._ttl,
            "urgency": "high" if delivery.get("severity") == "critical" else "normal",
        }
        result = await self._http.post(
            sub.endpoint, encrypt(plain, sub), headers, classify_push, https_only=True
        )
        if result.outcome == "ok" and result.provider_message_id is None:
            result = SendResult("ok", result.status_code, provider_message_id=str(delivery["delivery_id"]))
        return result

    async def aclose(self) -> None:
        await self._http.aclose()
