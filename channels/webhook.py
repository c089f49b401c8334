"""The outbound webhook: a JSON POST signed per the Standard Webhooks spec.

Headers: ``webhook-id`` (the delivery id: the same on every retry, so a receiver dedupes
on it), ``webhook-timestamp`` (seconds since the epoch) and ``webhook-signature``
(``v1,`` + base64 HMAC-SHA256 over ``id.timestamp.body`` with the endpoint's ``whsec_``
secret), signed by the spec's own library. One async client per process reuses
connections; redirects are never followed (a 3xx is a permanent failure: the endpoint
must name its real URL), and every connection goes through the SSRF guard.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

from yarl import URL

from channels.base import Endpoint, SendResult
from channels.net import GuardedPoster
from config.settings import Settings
from core.webhooks import signed_headers

log = logging.getLogger(__name__)

# A Retry-After longer than this is read as this: a tier still has to pick it.
MAX_RETRY_AFTER_S = 24 * 3600.0


def absolute_url(target_url: str | None, app_url: str | None) -> str | None:
    """A relative ``target_url`` joined to ``HERALD_APP_URL``; without one, sent as it is."""
    if not target_url or target_url.startswith(("https://", "http://")) or not app_url:
        return target_url
    return app_url.rstrip("/") + "/" + target_url.lstrip("/")


def notification_body(delivery: dict[str, Any], app_url: str | None) -> dict[str, Any]:
    """DESIGN.md's webhook body, from the delivery record (already redacted by ingest)."""
    return {
        "type": "notification",
        "id": delivery["delivery_id"],
        "notification_id": delivery["notification_id"],
        "user_id": delivery["user_id"],
        "severity": delivery["severity"],
        "category": delivery.get("category"),
        "title": delivery["title"],
        "summary": delivery.get("summary"),
        "url": absolute_url(delivery.get("target_url"), app_url),
        "occurred_at": delivery["occurred_at"],
    }


def digest_body(delivery: dict[str, Any], app_url: str | None) -> dict[str, Any]:
    """DESIGN.md's digest body, from a digest record (redacted by the digest process)."""
    return {
        "type": "digest",
        "id": delivery["delivery_id"],
        "user_id": delivery["user_id"],
        "batch_key": delivery.get("batch_key"),
        "count": delivery["count"],
        "items": [
            {
                "notification_id": i.get("notification_id"),
                "title": i.get("title"),
                "url": absolute_url(i.get("target_url"), app_url),
            }
            for i in delivery["items"]
        ],
        "window_start": delivery["window_start"],
        "window_end": delivery["window_end"],
    }


def webhook_body(delivery: dict[str, Any], app_url: str | None) -> dict[str, Any]:
    """A digest record (it has ``items``) or a single delivery's."""
    if delivery.get("type") == "digest" and "items" in delivery:
        return digest_body(delivery, app_url)
    return notification_body(delivery, app_url)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """HTTP ``Retry-After``: delay-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, delay), MAX_RETRY_AFTER_S)


def classify(code: int, headers: Mapping[str, str]) -> SendResult:
    """What an HTTP answer means for this delivery (``headers``: case-insensitive)."""
    if 200 <= code < 300:
        return SendResult("ok", code, provider_message_id=headers.get("x-request-id"))
    if code == 410:
        return SendResult("gone", code, error="410 Gone: the endpoint is disabled")
    if code == 429 or code == 408 or code >= 500:
        retry_after = retry_after_seconds(headers.get("retry-after"))
        return SendResult("transient", code, error=f"HTTP {code}", retry_after_s=retry_after)
    if 300 <= code < 400:
        return SendResult("permanent", code, error=f"HTTP {code}: redirects are not followed")
    return SendResult("permanent", code, error=f"HTTP {code}")


class WebhookProvider:
    channel = "webhook"

    def __init__(self, settings: Settings) -> None:
        self._app_url = settings.app_url
        w = settings.webhook
        self._http = GuardedPoster(
            w.allow_private_targets, connections=settings.delivery.concurrency, timeout_s=w.timeout_s
        )

    def target(self, endpoint: Endpoint) -> str:
        try:
            url = URL(endpoint.address)
            return f"{url.host or ''}:{url.port or ''}"
        except ValueError:
            return endpoint.address[:100]

    async def send(self, endpoint: Endpoint, delivery: dict[str, Any]) -> SendResult:
        if not endpoint.secret:
            return SendResult("permanent", error="the endpoint has no signing secret: add it again")
        body = json.dumps(webhook_body(delivery, self._app_url), separators=(",", ":")).encode()
        msg_id = str(delivery["delivery_id"])
        headers = {"content-type": "application/json", **signed_headers(endpoint.secret, msg_id, body)}
        result = await self._http.post(endpoint.address, body, headers, classify)
        if result.outcome == "ok" and result.provider_message_id is None:
            result = SendResult("ok", result.status_code, provider_message_id=msg_id)
        return result

    async def aclose(self) -> None:
        await self._http.aclose()
