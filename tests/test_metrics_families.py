"""Each metric family of the consumers moves as the records say: consumed, processed and
failed by topic; dead letters by topic and reason; batch and commit durations; delivery
outcomes, provider status classes and end-to-end latency by channel and severity."""

from __future__ import annotations

import json
import time

import psycopg
import pytest
from prometheus_client import REGISTRY

from config.settings import Settings
from producers.topics import Topics, ensure_topics
from tests.conftest import Backend
from tests.helpers import event, ingest
from tests.ops_support import produce_single
from tests.test_deliver import critical, deliver_settings, final, peer, start_deliver, user_with, wait_until
from tests.webhook_peer import WebhookPeer

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]
AGE_S = 30
__all__ = ["peer"]  # the webhook peer fixture


@pytest.fixture
def dsettings(backend: Backend) -> Settings:
    return deliver_settings(backend)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_consumer_families_move_with_the_records(db: Conn, dsettings: Settings, peer: WebhookPeer) -> None:
    s = dsettings
    topics = Topics(s.topic_prefix)
    delivery_topic = topics.deliveries("webhook")
    user_with(db, s, "fam-ok", peer.url("/ok"))
    user_with(db, s, "fam-refused", peer.url("/status/400"))
    user_with(db, s, "fam-flaky", peer.url("/flaky/1"))
    names = [
        ("herald_records_consumed_total", {"consumer": "ingest", "topic": topics.events}),
        ("herald_records_processed_total", {"consumer": "ingest", "topic": topics.events}),
        ("herald_records_failed_total", {"consumer": "ingest", "topic": topics.events}),
        ("herald_dlq_records_total", {"topic": topics.events_dlq, "reason": "not_json"}),
        ("herald_batch_seconds_count", {"consumer": "ingest"}),
        ("herald_commit_seconds_count", {"consumer": "ingest"}),
        ("herald_records_consumed_total", {"consumer": "deliver-webhook", "topic": delivery_topic}),
        ("herald_records_processed_total", {"consumer": "deliver-webhook", "topic": delivery_topic}),
        ("herald_records_failed_total", {"consumer": "deliver-webhook", "topic": delivery_topic}),
        ("herald_dlq_records_total", {"topic": topics.deliveries_dlq("webhook"), "reason": "permanent"}),
        ("herald_batch_seconds_count", {"consumer": "deliver-webhook"}),
        ("herald_deliver_outcomes_total", {"channel": "webhook", "outcome": "sent"}),
        ("herald_deliver_outcomes_total", {"channel": "webhook", "outcome": "retry"}),
        ("herald_deliver_outcomes_total", {"channel": "webhook", "outcome": "dlq"}),
        ("herald_deliver_responses_total", {"channel": "webhook", "status_class": "2xx"}),
        ("herald_deliver_responses_total", {"channel": "webhook", "status_class": "4xx"}),
        ("herald_deliver_responses_total", {"channel": "webhook", "status_class": "5xx"}),
        ("herald_delivery_latency_seconds_count", {"channel": "webhook", "severity": "critical"}),
        ("herald_delivery_latency_seconds_count", {"channel": "webhook", "severity": "warning"}),
        ("herald_delivery_latency_seconds_sum", {"channel": "webhook", "severity": "critical"}),
        ("herald_delivery_latency_seconds_sum", {"channel": "webhook", "severity": "warning"}),
    ]
    before = {(n, tuple(sorted(labels.items()))): value(n, **labels) for n, labels in names}

    db.execute("UPDATE notification_preferences SET digest_minutes = 0 WHERE user_id = 'fam-ok'")
    values = [
        json.dumps(critical("fam-ok")).encode(),
        json.dumps(event(user_id="fam-ok", severity="warning")).encode(),
        json.dumps(critical("fam-refused")).encode(),
        json.dumps(critical("fam-flaky")).encode(),
        b"not json",
    ]
    # Stamped 30 s ago on the events topic: the end-to-end latency counts from there, not
    # from the delivery record ingest wrote.
    started = time.time()
    stamp = int((started - AGE_S) * 1000)
    ensure_topics(s, topics.ingest_topics())
    offsets = produce_single(s, topics.events, values, timestamps_ms=[stamp] * len(values))
    ingest(s, [(topics.events, 0, o) for o in offsets])
    runner = start_deliver(s)
    try:
        wait_until(final(db, "fam-ok", 2), what="fam-ok's two deliveries sent")
        wait_until(final(db, "fam-refused"), what="fam-refused's delivery dead-lettered")
        wait_until(final(db, "fam-flaky"), what="fam-flaky's delivery sent on its second try", timeout=30)
    finally:
        runner.stop()
    elapsed = time.time() - started

    got = {key: value(key[0], **dict(key[1])) - was for key, was in before.items()}

    def delta(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    events = {"consumer": "ingest", "topic": topics.events}
    assert delta("herald_records_consumed_total", **events) == 5
    assert delta("herald_records_processed_total", **events) == 5
    assert delta("herald_records_failed_total", **events) == 1
    assert delta("herald_dlq_records_total", topic=topics.events_dlq, reason="not_json") == 1
    assert delta("herald_batch_seconds_count", consumer="ingest") >= 1
    assert delta("herald_commit_seconds_count", consumer="ingest") >= 1

    # 4 deliveries, one of them read twice (its retry record, from the retry topic).
    deliver = {"consumer": "deliver-webhook", "topic": delivery_topic}
    assert delta("herald_records_consumed_total", **deliver) == 4
    assert delta("herald_records_processed_total", **deliver) == 4
    assert delta("herald_records_failed_total", **deliver) == 1
    assert delta("herald_dlq_records_total", topic=topics.deliveries_dlq("webhook"), reason="permanent") == 1
    assert delta("herald_batch_seconds_count", consumer="deliver-webhook") >= 2
    outcome = {
        o: delta("herald_deliver_outcomes_total", channel="webhook", outcome=o)
        for o in ("sent", "retry", "dlq")
    }
    assert outcome == {"sent": 3, "retry": 1, "dlq": 1}
    classes = {
        c: delta("herald_deliver_responses_total", channel="webhook", status_class=c)
        for c in ("2xx", "4xx", "5xx")
    }
    assert classes == {"2xx": 3, "4xx": 1, "5xx": 1}
    assert delta("herald_delivery_latency_seconds_count", channel="webhook", severity="critical") == 2
    assert delta("herald_delivery_latency_seconds_count", channel="webhook", severity="warning") == 1
    for severity, n in (("critical", 2), ("warning", 1)):
        spent = delta("herald_delivery_latency_seconds_sum", channel="webhook", severity=severity)
        assert AGE_S * n <= spent <= (AGE_S + elapsed) * n, "from the event's record timestamp to acceptance"
