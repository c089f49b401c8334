"""The webhook channel end to end: events in, signed POSTs out, every outcome recorded.

Real parts only: the session's broker and PostgreSQL, the real ingest, and a real HTTP
receiver on loopback that checks each signature with the spec's algorithm. Timers are
short (retry tiers of a second or two, a 1 s provider timeout).
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

from config.settings import Settings
from consumers.deliver import H_ATTEMPTS, H_DUE
from consumers.dlq import decode_headers
from consumers.outbox import OutboxRelay
from core.webhooks import new_secret
from herald.inspect import Record, read_topic
from herald.processes import DeliverRun, run_deliver
from producers.publisher import KafkaPublisher
from producers.topics import Topics
from storage.db import Database
from storage.preferences import add_endpoint
from tests.conftest import Backend
from tests.helpers import RunThread, event, ingest, make_settings, produce, start_thread
from tests.webhook_peer import WebhookPeer, start_peer

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]
SECRET = new_secret()


@pytest.fixture
def peer() -> Iterator[WebhookPeer]:
    p = start_peer(SECRET, hang_s=2.5)
    yield p
    p.close()


def deliver_settings(backend: Backend, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "delivery": {"retry_tiers": ["1s", "2s"], "max_attempts": 3, "lease_s": 10},
        "webhook": {"timeout_s": 1.0, "allow_private_targets": True},
        "app_url": "https://app.example.com/",
    }
    values.update(overrides)
    return make_settings(backend.bootstrap, backend.database_url, **values)


@pytest.fixture
def dsettings(backend: Backend) -> Settings:
    return deliver_settings(backend)


def start_deliver(
    settings: Settings, group: str | None = None, channel: str = "webhook"
) -> RunThread[DeliverRun]:
    return start_thread(
        "deliver",
        group or f"d-{uuid.uuid4().hex[:8]}",
        lambda g, st: run_deliver(settings, channel, group=g, stopper=st),
    )


def wants(
    db: Conn,
    settings: Settings,
    user: str,
    channel: str,
    addresses: tuple[str, ...],
    secret: str | None = None,
) -> list[int]:
    """A user who wants ``channel``, with these endpoints (URLs, email addresses, subscriptions)."""
    db.execute(
        f"INSERT INTO notification_preferences (user_id, {channel}) VALUES (%s, true)"  # noqa: S608
        f" ON CONFLICT (user_id) DO UPDATE SET {channel} = true",
        (user,),
    )
    d = Database.from_settings(settings)
    try:
        return [add_endpoint(d, user, channel, a, secret) for a in addresses]
    finally:
        d.close()


def user_with(db: Conn, settings: Settings, user: str, *urls: str) -> list[int]:
    """A user who wants webhooks, with these endpoints (all signed with SECRET)."""
    return wants(db, settings, user, "webhook", urls, SECRET)


def deliver_until_final(
    settings: Settings, db: Conn, user: str, n: int = 1, channel: str = "webhook", timeout: float = 30
) -> None:
    """Run the channel's deliverer until ``user``'s ``n`` deliveries are final."""
    runner = start_deliver(settings, channel=channel)
    try:
        wait_until(final(db, user, n, channel), timeout=timeout, what=f"{user}'s {channel} deliveries final")
    finally:
        runner.stop()


def send_events(settings: Settings, *events: dict[str, Any]) -> None:
    ingest(settings, produce(settings, events))


def wait_until(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout}s")


def rows(db: Conn, user: str, channel: str = "webhook") -> list[dict[str, Any]]:
    cur = db.execute(
        "SELECT id, status, status_reason, attempts, last_error, provider_message_id, sent_at"
        " FROM deliveries WHERE user_id = %s AND channel = %s ORDER BY created_at",
        (user, channel),
    )
    names = [c.name for c in cur.description or []]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def final(db: Conn, user: str, n: int = 1, channel: str = "webhook") -> Callable[[], bool]:
    def check() -> bool:
        got = rows(db, user, channel)
        return len(got) == n and all(r["status"] in ("sent", "failed", "skipped") for r in got)

    return check


def dlq(settings: Settings, channel: str = "webhook") -> list[Record]:
    return read_topic(settings, Topics(settings.topic_prefix).deliveries_dlq(channel), timeout=10)


def critical(user: str, **fields: Any) -> dict[str, Any]:
    return event(user_id=user, severity="critical", **fields)


# -- the happy path -----------------------------------------------------------------------


def test_happy_path_sends_exactly_the_documented_bytes(
    db: Conn, dsettings: Settings, peer: WebhookPeer
) -> None:
    user_with(db, dsettings, "alice", peer.url("/ok"))
    ev = critical(
        "alice",
        title="Payment failed for card 4242 4242 4242 4242",
        body="full body with secret-body-text",
        summary="Card 4111111111111111 was declined; mail bob@example.com",
        data={"secret": "secret-data-value"},
        category="billing",
        target_url="/invoices/42",
    )
    send_events(dsettings, ev)
    runner = start_deliver(dsettings)
    try:
        wait_until(final(db, "alice"), what="alice's delivery sent")
    finally:
        runner.stop()

    (got,) = peer.at("/ok")
    assert got.verified, "the signature must verify with the spec's algorithm"
    body = got.json
    row = rows(db, "alice")[0]
    assert set(body) == {"type", "id", "notification_id", "user_id", "severity", "category"} | {
        "title",
        "summary",
        "url",
        "occurred_at",
    }
    assert body["type"] == "notification"
    assert body["id"] == str(row["id"]) == got.headers["webhook-id"]
    assert body["url"] == "https://app.example.com/invoices/42"
    assert body["severity"] == "critical" and body["category"] == "billing"
    raw = got.body.decode()
    for leaked in (
        "secret-body-text",
        "secret-data-value",
        "4242 4242 4242 4242",
        "4111111111111111",
        "bob@example.com",
    ):
        assert leaked not in raw, f"{leaked!r} left the system"
    assert '"data"' not in raw and '"body"' not in raw
    assert got.headers["content-type"] == "application/json"
    assert row["status"] == "sent" and row["attempts"] == 1 and row["sent_at"] is not None
    assert row["provider_message_id"]
    tries = db.execute(
        "SELECT attempt, outcome, status_code FROM delivery_attempts WHERE delivery_id = %s", (row["id"],)
    )
    assert tries.fetchall() == [(1, "ok", 200)]


def test_relative_url_without_app_url_is_sent_as_is(db: Conn, backend: Backend, peer: WebhookPeer) -> None:
    s = deliver_settings(backend, app_url=None)
    user_with(db, s, "rel", peer.url("/ok"))
    send_events(s, critical("rel", target_url="/inbox/7"))
    runner = start_deliver(s)
    try:
        wait_until(final(db, "rel"))
    finally:
        runner.stop()
    assert peer.at("/ok")[0].json["url"] == "/inbox/7"


# -- permanent failures, 410, exhaustion ---------------------------------------------------


def test_permanent_error_dead_letters_with_every_header(
    db: Conn, dsettings: Settings, peer: WebhookPeer
) -> None:
    user_with(db, dsettings, "perm", peer.url("/status/422"))
    send_events(dsettings, critical("perm"))
    runner = start_deliver(dsettings)
    try:
        wait_until(final(db, "perm"))
    finally:
        runner.stop()
    (row,) = rows(db, "perm")
    assert (row["status"], row["status_reason"], row["attempts"]) == ("failed", "permanent", 1)
    assert row["last_error"] == "HTTP 422"
    assert len(peer.at("/status/422")) == 1, "a permanent error is not retried"
    (dead,) = dlq(dsettings)
    h = decode_headers(dead.headers)
    topics = Topics(dsettings.topic_prefix)
    assert h["herald-dlt-reason"] == "permanent"
    assert h["kafka_dlt-original-topic"] == topics.deliveries("webhook")
    assert isinstance(h["kafka_dlt-original-offset"], int) and isinstance(
        h["kafka_dlt-original-partition"], int
    )
    assert isinstance(h["kafka_dlt-original-timestamp"], int) and h["kafka_dlt-original-timestamp"] > 0
    assert h["kafka_dlt-exception-fqcn"] == "consumers.deliver.DeliveryFailed"
    assert h["kafka_dlt-exception-message"] == "HTTP 422"
    assert struct.unpack(">i", dead.headers[H_ATTEMPTS])[0] == 1
    assert dead.headers["herald-delivery-id"] == str(row["id"]).encode()
    assert json.loads(dead.value or b"")["delivery_id"] == str(row["id"])


def test_gone_disables_the_endpoint_and_later_deliveries_skip(
    db: Conn, dsettings: Settings, peer: WebhookPeer
) -> None:
    (eid,) = user_with(db, dsettings, "gone", peer.url("/status/410"))
    send_events(dsettings, critical("gone"))
    runner = start_deliver(dsettings)
    try:
        wait_until(final(db, "gone"))
        (row,) = rows(db, "gone")
        assert (row["status"], row["status_reason"]) == ("failed", "endpoint_gone")
        disabled = db.execute("SELECT disabled_at FROM channel_endpoints WHERE id = %s", (eid,)).fetchone()
        assert disabled is not None and disabled[0] is not None
        send_events(dsettings, critical("gone"))
        wait_until(final(db, "gone", 2))
    finally:
        runner.stop()
    second = rows(db, "gone")[1]
    assert (second["status"], second["status_reason"]) == ("skipped", "no_endpoint")
    assert len(peer.at("/status/410")) == 1, "a disabled endpoint is never called again"
    assert [decode_headers(r.headers)["herald-dlt-reason"] for r in dlq(dsettings)] == ["endpoint_gone"]


def test_no_endpoint_is_skipped_without_retry(db: Conn, dsettings: Settings) -> None:
    user_with(db, dsettings, "nobody")
    send_events(dsettings, critical("nobody"))
    runner = start_deliver(dsettings)
    try:
        wait_until(final(db, "nobody"))
    finally:
        runner.stop()
    (row,) = rows(db, "nobody")
    assert (row["status"], row["status_reason"]) == ("skipped", "no_endpoint")
    assert read_topic(dsettings, Topics(dsettings.topic_prefix).retry("webhook", "1s"), timeout=10) == []
    assert dlq(dsettings) == []


def test_exhausted_retries_dead_letter_with_the_attempt_count(
    db: Conn, dsettings: Settings, peer: WebhookPeer
) -> None:
    user_with(db, dsettings, "tired", peer.url("/status/503"))
    send_events(dsettings, critical("tired"))
    runner = start_deliver(dsettings)
    try:
        wait_until(final(db, "tired"), timeout=40)
    finally:
        runner.stop()
    (row,) = rows(db, "tired")
    assert (row["status"], row["status_reason"], row["attempts"]) == ("failed", "exhausted", 3)
    calls = peer.at("/status/503")
    assert len(calls) == 3 and len({c.headers["webhook-id"] for c in calls}) == 1
    (dead,) = dlq(dsettings)
    assert decode_headers(dead.headers)["herald-dlt-reason"] == "exhausted"
    assert struct.unpack(">i", dead.headers[H_ATTEMPTS])[0] == dsettings.delivery.max_attempts
    # The tiers: 1 s after the first try, then 2 s after the second (whole seconds on the wire).
    t0, t1, t2 = (int(c.headers["webhook-timestamp"]) for c in calls)
    assert t1 - t0 >= 1 and t2 - t1 >= 2
    tries = db.execute(
        "SELECT attempt, outcome, status_code FROM delivery_attempts WHERE delivery_id = %s ORDER BY 1",
        (row["id"],),
    ).fetchall()
    assert tries == [(1, "transient", 503), (2, "transient", 503), (3, "transient", 503)]


def test_timeouts_and_dropped_connections_are_transient(
    db: Conn, backend: Backend, peer: WebhookPeer
) -> None:
    s = deliver_settings(backend, delivery={"retry_tiers": ["1s"], "max_attempts": 2, "lease_s": 10})
    user_with(db, s, "slow", peer.url("/hang"))
    user_with(db, s, "cut", peer.url("/drop"))
    send_events(s, critical("slow"), critical("cut"))
    runner = start_deliver(s)
    try:
        wait_until(lambda: final(db, "slow")() and final(db, "cut")(), timeout=40)
    finally:
        runner.stop()
    slow, cut = rows(db, "slow")[0], rows(db, "cut")[0]
    assert (slow["status"], slow["status_reason"], slow["attempts"]) == ("failed", "exhausted", 2)
    assert slow["last_error"] == "timed out after 1s"
    assert (cut["status"], cut["status_reason"], cut["attempts"]) == ("failed", "exhausted", 2)
    assert "ServerDisconnected" in cut["last_error"] or "ClientOSError" in cut["last_error"], cut[
        "last_error"
    ]
    assert len(peer.at("/hang")) == 2 and len(peer.at("/drop")) == 2


def test_retry_after_longer_than_a_tier_picks_a_later_one(
    db: Conn, backend: Backend, peer: WebhookPeer
) -> None:
    s = deliver_settings(backend, delivery={"retry_tiers": ["1s", "3s"], "max_attempts": 2, "lease_s": 10})
    user_with(db, s, "busy", peer.url("/status/429?retry_after=2"))
    send_events(s, critical("busy"))
    runner = start_deliver(s)
    try:
        wait_until(final(db, "busy"), timeout=30)
    finally:
        runner.stop()
    topics = Topics(s.topic_prefix)
    assert read_topic(s, topics.retry("webhook", "1s"), timeout=10) == []
    (retried,) = read_topic(s, topics.retry("webhook", "3s"), timeout=10)
    assert struct.unpack(">i", retried.headers[H_ATTEMPTS])[0] == 1
    due_ms = int(retried.headers[H_DUE])
    assert due_ms - retried.timestamp_ms >= 3000 - 50
    first, second = peer.at("/status/429")
    assert int(second.headers["webhook-timestamp"]) >= int(first.headers["webhook-timestamp"]) + 2


# -- due times: nothing early, no partition held back by another ----------------------------


def test_retry_records_wait_for_their_due_time_per_partition(
    db: Conn, dsettings: Settings, peer: WebhookPeer
) -> None:
    """Two retry records on two partitions of one tier topic: the later-due head record
    pauses only its own partition; the other is delivered when due, not held back."""
    user_with(db, dsettings, "early", peer.url("/ok"))
    user_with(db, dsettings, "late", peer.url("/ok"))
    send_events(dsettings, critical("early"), critical("late"))
    ids = {u: rows(db, u)[0]["id"] for u in ("early", "late")}
    # As after a first failed try: the rows wait on the retry topic (the main records are now stale).
    db.execute(
        "UPDATE deliveries SET status = 'retrying', attempts = 1 WHERE id = ANY(%s)", (list(ids.values()),)
    )
    main = {
        json.loads(r.value or b"")["user_id"]: r
        for r in read_topic(dsettings, Topics(dsettings.topic_prefix).deliveries("webhook"))
    }
    topic = Topics(dsettings.topic_prefix).retry("webhook", "2s")
    now_ms = int(time.time() * 1000)
    due = {"late": now_ms + 9000, "early": now_ms + 1500}
    producer = Producer(dsettings.kafka_client_config())
    for part, user in ((0, "late"), (1, "early")):
        headers = [
            ("herald-delivery-id", str(ids[user]).encode()),
            (H_ATTEMPTS, struct.pack(">i", 1)),
            (H_DUE, str(due[user]).encode()),
        ]
        producer.produce(topic, main[user].value, key=user.encode(), partition=part, headers=headers)
    assert producer.flush(10) == 0
    runner = start_deliver(dsettings)
    try:
        wait_until(lambda: len(peer.at("/ok")) == 2, timeout=30, what="both deliveries")
    finally:
        runner.stop()
    arrived = {r.json["user_id"]: r for r in peer.at("/ok")}
    sent_at = {u: rows(db, u)[0]["sent_at"].timestamp() * 1000 for u in ids}
    assert sent_at["early"] >= due["early"], "sent before it was due"
    assert sent_at["late"] >= due["late"], "sent before it was due"
    assert sent_at["early"] < due["late"] - 3000, "held back by the other partition's later record"
    assert set(arrived) == {"early", "late"}
    assert all(r["attempts"] == 2 for u in ids for r in rows(db, u))


# -- several endpoints, duplicates ----------------------------------------------------------


def test_two_endpoints_one_failing_then_recovering_each_receive_it_once(
    db: Conn, dsettings: Settings, peer: WebhookPeer
) -> None:
    user_with(db, dsettings, "both", peer.url("/ok"), peer.url("/flaky/1"))
    send_events(dsettings, critical("both"))
    runner = start_deliver(dsettings)
    try:
        wait_until(final(db, "both"), timeout=30)
    finally:
        runner.stop()
    (row,) = rows(db, "both")
    assert (row["status"], row["attempts"]) == ("sent", 2)
    assert peer.ids("/ok", status=None) == {str(row["id"]): 1}, "the healthy endpoint is not sent the retry"
    assert peer.ids("/flaky/1") == {str(row["id"]): 1}
    assert len(peer.at("/flaky/1")) == 2


def test_a_duplicate_delivery_record_is_skipped_not_resent(
    db: Conn, dsettings: Settings, peer: WebhookPeer
) -> None:
    user_with(db, dsettings, "dup", peer.url("/ok"))
    before = _skipped("sent")
    send_events(dsettings, critical("dup"))
    runner = start_deliver(dsettings)
    try:
        wait_until(final(db, "dup"))
        # As after an ingest crash between publish and mark-published: the outbox publishes again.
        db.execute("UPDATE deliveries SET published_at = NULL WHERE user_id = 'dup'")
        relay_settings = dsettings.model_copy(update={"outbox_relay_after_s": 0.001})
        d, pub = Database.from_settings(dsettings), KafkaPublisher(dsettings)
        try:
            assert OutboxRelay(relay_settings, d, pub, Topics(dsettings.topic_prefix)).run_once() == 1
        finally:
            d.close()
            pub.close()
        main = read_topic(dsettings, Topics(dsettings.topic_prefix).deliveries("webhook"))
        assert len(main) == 2, "the record is on the topic twice"
        wait_until(lambda: _skipped("sent") >= before + 1, timeout=20, what="the skip")
    finally:
        runner.stop()
    assert len(peer.at("/ok")) == 1
    assert rows(db, "dup")[0]["attempts"] == 1


def _skipped(reason: str) -> float:
    from prometheus_client import REGISTRY

    return (
        REGISTRY.get_sample_value("herald_deliver_skipped_total", {"channel": "webhook", "reason": reason})
        or 0.0
    )


# -- a rebalance never waits on a provider's timeout ---------------------------------------


def test_a_rebalance_cancels_a_hanging_send_instead_of_waiting_for_its_timeout(
    db: Conn, backend: Backend
) -> None:
    timeout_s = 20.0
    peer = start_peer(SECRET, hang_s=60)
    s = deliver_settings(
        backend,
        session_timeout_ms=6000,
        delivery={"retry_tiers": ["1s", "2s"], "max_attempts": 3, "lease_s": 10, "rebalance_grace_s": 1},
        webhook={"timeout_s": timeout_s, "allow_private_targets": True},
    )
    group = f"d-{uuid.uuid4().hex[:8]}"
    user_with(db, s, "stuck", peer.url("/hang"))
    send_events(s, critical("stuck"))
    first = start_deliver(s, group)
    second = None
    try:
        peer.wait_for("/hang", 1, timeout=30)
        started = time.monotonic()
        second = start_deliver(s, group)  # joins the group: the first must give up its partitions
        peer.wait_for("/hang", 2, timeout=timeout_s)
        waited = time.monotonic() - started
        assert waited < timeout_s / 2, f"the rebalance waited {waited:.1f}s on the hanging send"
        ids = {r.headers["webhook-id"] for r in peer.at("/hang")}
        assert len(ids) == 1, "the same delivery, sent again by the partition's next owner"
        peer.hang_release.set()
        wait_until(final(db, "stuck"), timeout=30)
    finally:
        peer.close()
        first.stop()
        if second is not None:
            second.stop()
    (row,) = rows(db, "stuck")
    assert row["status"] == "sent"


def test_a_rebalance_lets_a_send_finish_within_the_grace(
    db: Conn, backend: Backend, peer: WebhookPeer
) -> None:
    s = deliver_settings(
        backend,
        session_timeout_ms=6000,
        delivery={"retry_tiers": ["1s"], "max_attempts": 3, "lease_s": 10, "rebalance_grace_s": 8},
        webhook={"timeout_s": 5.0, "allow_private_targets": True},
    )
    group = f"d-{uuid.uuid4().hex[:8]}"
    user_with(db, s, "patient", peer.url("/slow/2500"))
    send_events(s, critical("patient"))
    first = start_deliver(s, group)
    second = None
    try:
        peer.wait_for("/slow/2500", 1, timeout=30)
        second = start_deliver(s, group)  # a rebalance while the send is in flight
        wait_until(final(db, "patient"), timeout=30)
        time.sleep(3)  # the partition's next owner had time to read the record again
    finally:
        first.stop()
        if second is not None:
            second.stop()
    (row,) = rows(db, "patient")
    assert row["status"] == "sent" and row["attempts"] == 1, row
    assert len(peer.at("/slow/2500")) == 1, "finished within the grace: recorded, committed, not sent again"


def test_postgres_failing_the_claim_retries_it_and_loses_nothing(
    db: Conn, dsettings: Settings, peer: WebhookPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by `herald chaos`: PostgreSQL going away during a batch's claim transaction left
    # the batch marked planned with nothing to send, so the loop committed past its records
    # and their rows stayed `queued` for ever. The claim's first look-up fails here, once.
    import storage.deliveries as store
    from core.errors import DatabaseUnavailable

    real = store.states
    failures = []

    def states_failing_once(cur: Any, ids: Any) -> Any:
        if not failures:
            failures.append(len(ids))
            raise DatabaseUnavailable("the database went away during the claim (injected)")
        return real(cur, ids)

    user_with(db, dsettings, "pia", peer.url("/ok"))
    send_events(dsettings, *(critical("pia", title=f"Alert {i}") for i in range(5)))
    monkeypatch.setattr(store, "states", states_failing_once)
    deliver_until_final(dsettings, db, "pia", n=5)

    assert failures, "the injected failure never happened: the test proves nothing"
    assert [r["status"] for r in rows(db, "pia")] == ["sent"] * 5
    assert sorted(peer.ids("/ok").values()) == [1] * 5
