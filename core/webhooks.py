"""Standard Webhooks, both directions: the ``whsec_`` secret and the three signed headers.

The outbound webhook channel signs with it, and the receiver's ``standard-webhooks``
scheme signs test and backfill requests with it (``herald produce --to-receiver``), so the
two always agree on the format. Signatures come from the specification's own library.
"""

from __future__ import annotations

import base64
import secrets
import time
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook


def new_secret() -> str:
    """A fresh signing secret in the ``whsec_`` format (24 random bytes, base64)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def signed_headers(secret: str, msg_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """``webhook-id``, ``webhook-timestamp`` (whole seconds) and ``webhook-signature`` (v1,
    HMAC-SHA256 over ``id.timestamp.body``) for ``body`` signed with ``secret``."""
    at = datetime.fromtimestamp(int(time.time() if now is None else now), UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode("utf-8")),
    }
