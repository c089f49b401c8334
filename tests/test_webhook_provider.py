"""The webhook provider against a real HTTP peer: SSRF refusals, answers and their meaning.

No broker or database: the provider is called directly, as the deliverer calls it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from channels.base import Endpoint, SendResult
from channels.webhook import WebhookProvider
from config.settings import Settings
from core.webhooks import new_secret
from tests.webhook_peer import WebhookPeer, start_peer

SECRET = new_secret()


@pytest.fixture
def peer() -> Iterator[WebhookPeer]:
    p = start_peer(SECRET, hang_s=1.5)
    yield p
    p.close()


def delivery() -> dict[str, Any]:
    return {
        "delivery_id": str(uuid.uuid4()),
        "notification_id": str(uuid.uuid4()),
        "user_id": "u1",
        "severity": "critical",
        "category": None,
        "title": "t",
        "summary": None,
        "target_url": None,
        "occurred_at": "2026-11-25T00:00:00+00:00",
    }


def send_all(settings: Settings, urls: list[str]) -> list[SendResult]:
    async def go() -> list[SendResult]:
        provider = WebhookProvider(settings)
        try:
            return [await provider.send(Endpoint(1, "u1", url, SECRET), delivery()) for url in urls]
        finally:
            await provider.aclose()

    return asyncio.run(go())


def test_private_link_local_and_loopback_targets_are_refused_by_default(peer: WebhookPeer) -> None:
    port = peer.server.server_port
    targets = {
        f"http://127.0.0.1:{port}/ok": "loopback",
        f"http://localhost:{port}/ok": "loopback",  # a name that resolves to loopback
        f"http://[::1]:{port}/ok": "loopback",
        "http://169.254.169.254/latest/meta-data": "link-local",
        "http://10.0.0.7/hook": "private",
        "http://192.168.1.1/hook": "private",
        "http://[fe80::1]/hook": "link-local",
        "http://224.0.0.1/hook": "multicast",
        "http://0.0.0.0:9/hook": "private",
    }
    results = send_all(Settings(webhook={"timeout_s": 2.0}), list(targets))
    for (url, kind), result in zip(targets.items(), results, strict=True):
        assert result.outcome == "permanent", url
        assert result.error is not None and f"a {kind} address" in result.error, (url, result.error)
        assert "HERALD_WEBHOOK__ALLOW_PRIVATE_TARGETS" in result.error
    assert peer.received == [], "nothing reached the loopback server"


def test_allow_private_targets_lets_loopback_through(peer: WebhookPeer) -> None:
    allowed = Settings(webhook={"timeout_s": 2.0, "allow_private_targets": True})
    (result,) = send_all(allowed, [peer.url("/ok")])
    assert result.outcome == "ok" and result.status_code == 200
    assert peer.at("/ok")[0].verified


@pytest.mark.parametrize(
    ("path", "outcome", "code"),
    [
        ("/status/500", "transient", 500),
        ("/status/503", "transient", 503),
        ("/status/408", "transient", 408),
        ("/status/429", "transient", 429),
        ("/status/400", "permanent", 400),
        ("/status/404", "permanent", 404),
        ("/status/301", "permanent", 301),
        ("/status/410", "gone", 410),
        ("/hang", "transient", None),
        ("/drop", "transient", None),
    ],
)
def test_answers_are_classified(peer: WebhookPeer, path: str, outcome: str, code: int | None) -> None:
    settings = Settings(webhook={"timeout_s": 0.5, "allow_private_targets": True})
    (result,) = send_all(settings, [peer.url(path)])
    assert (result.outcome, result.status_code) == (outcome, code)


def test_retry_after_seconds_and_http_dates_are_honoured(peer: WebhookPeer) -> None:
    settings = Settings(webhook={"timeout_s": 2.0, "allow_private_targets": True})
    secs, date, junk = send_all(
        settings,
        [
            peer.url("/status/429?retry_after=120"),
            peer.url("/status/503?retry_after=Wed,%2021%20Oct%202099%2007:28:00%20GMT"),
            peer.url("/status/429?retry_after=soon"),
        ],
    )
    assert secs.retry_after_s == 120
    assert date.retry_after_s == 24 * 3600, "a far date is capped at a day"
    assert junk.retry_after_s is None


def test_an_endpoint_without_a_secret_is_a_permanent_error(peer: WebhookPeer) -> None:
    async def go() -> SendResult:
        provider = WebhookProvider(Settings(webhook={"allow_private_targets": True}))
        try:
            return await provider.send(Endpoint(1, "u1", peer.url("/ok"), None), delivery())
        finally:
            await provider.aclose()

    result = asyncio.run(go())
    assert result.outcome == "permanent" and peer.received == []
