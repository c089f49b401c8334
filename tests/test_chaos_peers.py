"""herald chaos's provider peers (herald/chaos/peers.py) against herald's real providers.

No broker or database: the webhook, push and email providers are called directly, as the
deliverer calls them, at the one peers process; each mode is switched over its control port.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from channels.base import Endpoint, Provider, SendResult
from channels.email import EmailProvider
from channels.push import PushProvider, generate_keys
from channels.webhook import WebhookProvider
from config.settings import PolicySettings, Settings
from core.digest import DigestItem, digest_record
from core.errors import HeraldError
from core.webhooks import new_secret
from herald.chaos.peers import PROVIDERS, Peers

VAPID_PRIVATE, _ = generate_keys()


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    with Peers(tmp_path_factory.mktemp("peers")) as p:
        yield p


@pytest.fixture(autouse=True)
def all_ok(peers: Peers) -> Iterator[None]:
    yield
    for provider in PROVIDERS:
        peers.set_mode(provider, "ok")


def settings(peers: Peers) -> Settings:
    values: dict[str, Any] = dict(
        webhook={"allow_private_targets": True, "timeout_s": 5.0},
        push={
            "vapid_private_key": VAPID_PRIVATE,
            "vapid_subject": "mailto:ops@example.com",
            "allow_private_targets": True,
            "timeout_s": 5.0,
        },
        smtp={
            "host": "127.0.0.1",
            "port": peers.smtp_port,
            "tls": "none",
            "from": "Herald <herald@chaos.example>",
            "timeout_s": 5.0,
        },
        app_url="https://app.example.com",
        public_url="https://herald.example.com",
        unsubscribe_secret="x" * 32,
    )
    return Settings(**values)


def single(user: str) -> dict[str, Any]:
    return {
        "delivery_id": str(uuid.uuid4()),
        "notification_id": str(uuid.uuid4()),
        "user_id": user,
        "severity": "critical",
        "category": None,
        "title": "Build failed",
        "summary": "main is red",
        "target_url": "/builds/7",
        "occurred_at": "2026-11-25T00:00:00+00:00",
    }


def digest(user: str, channel: str) -> dict[str, Any]:
    return digest_record(
        delivery_id=uuid.uuid4(),
        user_id=user,
        channel=channel,
        batch_key="jobs",
        window_start=datetime(2026, 11, 25, 10, 0, tzinfo=UTC),
        window_seconds=300,
        sequence=0,
        count=2,
        first=[DigestItem(uuid.uuid4(), "Job export failed", "/jobs/1")],
        critical=False,
        inbox_path="/notifications",
        policy=PolicySettings(),
    )


class Senders:
    """The three real providers, on the test's event loop, each with an endpoint at the peers."""

    def __init__(self, peers: Peers, user: str = "alice", secret: str | None = None) -> None:
        s = settings(peers)
        self.providers: dict[str, Provider] = {
            "webhook": WebhookProvider(s),
            "push": PushProvider(s),
            "email": EmailProvider(s),
        }
        self.endpoints = {
            "webhook": Endpoint(1, user, peers.webhook_url(user), secret or peers.webhook_secret),
            "push": Endpoint(2, user, peers.push_subscription(user)),
            "email": Endpoint(3, user, f"{user}@chaos.example"),
        }

    async def send(self, provider: str, delivery: dict[str, Any], url: str | None = None) -> SendResult:
        endpoint = self.endpoints[provider]
        if url is not None:
            endpoint = Endpoint(endpoint.id, endpoint.user_id, url, endpoint.secret)
        return await self.providers[provider].send(endpoint, delivery)

    async def aclose(self) -> None:
        for p in self.providers.values():
            await p.aclose()


def run(peers: Peers, body: Any, **kwargs: Any) -> Any:
    async def go() -> Any:
        senders = Senders(peers, **kwargs)
        try:
            return await body(senders)
        finally:
            await senders.aclose()

    return asyncio.run(go())


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_accepted_deliveries_are_recorded_with_their_id_user_and_kind(peers: Peers) -> None:
    before = len(peers.accepted())
    sent = {
        ("webhook", "notification"): single("alice"),
        ("webhook", "digest"): digest("alice", "webhook"),
        ("push", "notification"): single("alice"),
        ("push", "digest"): digest("alice", "push"),
        ("email", ""): single("alice"),
    }

    async def body(s: Senders) -> list[SendResult]:
        return [await s.send(provider, d) for (provider, _), d in sent.items()]

    started = time.time()
    results = run(peers, body)
    assert [r.outcome for r in results] == ["ok"] * 5, results
    assert [r.status_code for r in results] == [200, 200, 201, 201, 250]
    got = peers.accepted()[before:]
    assert [(a["provider"], a["kind"], a["id"], a["user"]) for a in got] == [
        (provider, kind, str(d["delivery_id"]), "alice") for (provider, kind), d in sent.items()
    ]
    assert all(started <= a["at"] <= time.time() for a in got)
    assert peers.accepted()[before:] == got, "fetched incrementally, kept whole"
    stats = peers.stats()
    assert stats["modes"] == dict.fromkeys(PROVIDERS, "ok")
    assert stats["webhook"]["accepted"] >= 2 and stats["email"]["accepted"] >= 1


def test_a_bad_signature_is_401_and_the_reject_endpoint_422_neither_recorded(peers: Peers) -> None:
    before, stats = len(peers.accepted()), peers.stats()["webhook"]

    async def body(s: Senders) -> list[SendResult]:
        bad = await s.send("webhook", single("bob"))
        rejected = await s.send("webhook", single("bob"), url=peers.reject_url("bob"))
        return [bad, rejected]

    bad, rejected = run(peers, body, user="bob", secret=new_secret())
    assert (bad.outcome, bad.status_code) == ("permanent", 401)
    assert (rejected.outcome, rejected.status_code) == ("permanent", 422)
    after = peers.stats()["webhook"]
    assert after["bad_signatures"] == stats["bad_signatures"] + 1
    assert after["rejected"] == stats["rejected"] + 1
    assert len(peers.accepted()) == before


@pytest.mark.parametrize(
    ("mode", "http", "smtp"), [("error", 503, 451), ("throttle", 429, 450)], ids=["error", "throttle"]
)
def test_error_and_throttle_answer_transiently_and_record_nothing(
    peers: Peers, mode: str, http: int, smtp: int
) -> None:
    before = len(peers.accepted())
    for provider in PROVIDERS:
        peers.set_mode(provider, mode)

    async def body(s: Senders) -> list[SendResult]:
        return [await s.send(provider, single("carol")) for provider in PROVIDERS]

    results = run(peers, body, user="carol")
    assert [(r.outcome, r.status_code) for r in results] == [
        ("transient", http),
        ("transient", http),
        ("transient", smtp),
    ], results
    if mode == "throttle":
        assert [r.retry_after_s for r in results[:2]] == [1.0, 1.0]
    assert len(peers.accepted()) == before
    stats = peers.stats()
    assert stats["modes"] == dict.fromkeys(PROVIDERS, mode)
    assert all(stats[p]["refused_by_mode"] >= 1 for p in PROVIDERS)


def test_down_refuses_connections_and_ok_listens_again_on_the_same_port(peers: Peers) -> None:
    ports = {"webhook": peers.webhook_port, "push": peers.push_port, "email": peers.smtp_port}

    async def body(s: Senders) -> dict[str, list[SendResult]]:
        out: dict[str, list[SendResult]] = {}
        for provider in PROVIDERS:
            first = await s.send(provider, single("dave"))  # leaves a kept-alive connection
            await asyncio.to_thread(peers.set_mode, provider, "down")
            assert await asyncio.to_thread(refused, ports[provider]), f"{provider} still listens"
            during = await s.send(provider, single("dave"))
            await asyncio.to_thread(peers.set_mode, provider, "ok")
            after = await s.send(provider, single("dave"))
            out[provider] = [first, during, after]
        return out

    before = len(peers.accepted())
    results = run(peers, body, user="dave")
    for provider, (first, during, after) in results.items():
        assert first.outcome == "ok" and after.outcome == "ok", (provider, first, after)
        assert during.outcome == "transient" and during.status_code is None, (provider, during)
    assert len(peers.accepted()) == before + 6
    assert all(peers.stats()[p]["reset"] >= 1 for p in PROVIDERS), "the kept-alive connections were reset"


def test_slow_answers_after_slow_ms_and_by_the_mode_of_that_moment(peers: Peers) -> None:
    for provider in PROVIDERS:
        peers.set_mode(provider, "slow", slow_ms=400)

    async def timed(s: Senders, provider: str) -> tuple[SendResult, float, float]:
        started = time.time()
        result = await s.send(provider, single("erin"))
        return result, started, time.time()

    async def body(s: Senders) -> tuple[list[tuple[SendResult, float, float]], SendResult]:
        slow = await asyncio.gather(*(timed(s, p) for p in PROVIDERS))
        pending = asyncio.create_task(s.send("webhook", single("erin")))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(peers.set_mode, "webhook", "error", 400)
        return list(slow), await pending

    before = len(peers.accepted())
    slow, switched = run(peers, body, user="erin")
    got = peers.accepted()[before:]
    assert len(got) == 3, "the switched request is answered by the mode at its answer: not recorded"
    for (result, started, ended), provider in zip(slow, PROVIDERS, strict=True):
        assert result.outcome == "ok", (provider, result)
        assert 0.35 <= ended - started < 2.0, (provider, ended - started)
        (accepted,) = [a for a in got if a["provider"] == provider]
        assert accepted["at"] - started >= 0.38, "recorded at the answer, after the wait"
    assert (switched.outcome, switched.status_code) == ("transient", 503)


def test_a_bad_mode_is_refused(peers: Peers) -> None:
    with pytest.raises(HeraldError, match="400"):
        peers.set_mode("webhook", "sideways")
    with pytest.raises(HeraldError, match="400"):
        peers.set_mode("fax", "ok")
    assert peers.stats()["modes"]["webhook"] == "ok"


def test_sigterm_stops_the_peers_cleanly(tmp_path: Path) -> None:
    peers = Peers(tmp_path)
    with peers:
        proc = peers._proc
        assert proc is not None and proc.poll() is None
    assert proc.returncode == 0
    assert "herald chaos peers:" in (tmp_path / "peers.log").read_text()
