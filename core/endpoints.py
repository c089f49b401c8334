"""What a channel endpoint may be: checked and written one way, for the CLI and the API (pure).

An email address is one plain address. A push subscription is the browser's
``PushSubscription`` JSON; only ``endpoint`` and ``keys`` (``p256dh``, a P-256 point, and
``auth``, 16 bytes, both base64url) are kept, sorted, so the same subscription sent twice
is one row. A webhook is an http(s) URL.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

MAX_ADDRESS = 2000
_NEEDS = (
    'a push subscription needs "endpoint" and "keys": an https:// endpoint, '
    'and keys with "p256dh" (a P-256 point) and "auth" (16 bytes), base64url'
)


def _b64url(text: Any, size: int, name: str) -> str:
    if not isinstance(text, str) or not text:
        raise ValueError(f"a push subscription needs keys.{name}")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"a push subscription's keys.{name} is not base64url") from None
    if len(raw) != size:
        raise ValueError(f"a push subscription's keys.{name} must be {size} bytes, got {len(raw)}")
    return text


def push_subscription(sub: Any, allow_http: bool = False) -> str:
    """The stored form of a ``PushSubscription`` (a dict or its JSON text)."""
    if isinstance(sub, str):
        try:
            sub = json.loads(sub)
        except json.JSONDecodeError as exc:
            raise ValueError(f"a push subscription must be JSON: {exc}") from None
    if not isinstance(sub, dict):
        raise ValueError(_NEEDS)
    endpoint, keys = sub.get("endpoint"), sub.get("keys")
    schemes = ("https://", "http://") if allow_http else ("https://",)
    if not isinstance(endpoint, str) or not endpoint.startswith(schemes) or len(endpoint) > MAX_ADDRESS:
        raise ValueError(_NEEDS)
    if not isinstance(keys, dict):
        raise ValueError(_NEEDS)
    stored = {
        "endpoint": endpoint,
        "keys": {
            "auth": _b64url(keys.get("auth"), 16, "auth"),
            "p256dh": _b64url(keys.get("p256dh"), 65, "p256dh"),
        },
    }
    return json.dumps(stored, separators=(",", ":"), sort_keys=True)


def email_address(address: str) -> str:
    if (
        not isinstance(address, str)
        or address.count("@") != 1
        or not address.split("@")[0]
        or "." not in address.split("@")[1]
        or any(c.isspace() or c in '<>,;"\\' for c in address)
        or len(address) > 320
    ):
        raise ValueError(f"not an email address: {str(address)[:100]!r}")
    return address


def endpoint_address(channel: str, address: Any, allow_http_push: bool = False) -> str:
    """``address`` checked for ``channel`` and in its stored form; ValueError saying why not."""
    if channel == "email":
        return email_address(address)
    if channel == "push":
        return push_subscription(address, allow_http_push)
    if channel == "webhook":
        if not isinstance(address, str) or not address.startswith(("https://", "http://")):
            raise ValueError(f"a webhook endpoint must be an http(s) URL, got {str(address)[:100]!r}")
        return address
    raise ValueError(f"unknown channel {channel!r}")
