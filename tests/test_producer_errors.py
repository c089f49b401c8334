"""Producer errors: permanent ones say what to fix, a dead letter too large for the broker lands
without its value, and nothing ``produce()`` raises crashes the process.

Measured with librdkafka 2.16 against the embedded broker (Tansu): librdkafka refuses a record
synchronously in ``produce()`` (MSG_SIZE_TOO_LARGE) when value + key + headers + ~36 bytes exceed
``message.max.bytes`` (1,000,000): an 8-byte key leaves 999,956 bytes of value. Tansu itself
accepts records of several MB and creates unknown topics on first produce.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import psycopg
import pytest
from confluent_kafka import KafkaError

from config.settings import Settings
from consumers.dlq import H_OFFSET, H_PARTITION, H_REASON, H_TIMESTAMP, H_TOPIC, decode_headers
from core.errors import BrokerMisconfigured, BrokerUnavailable, FatalBrokerError
from herald.embedded import free_port
from herald.inspect import committed, read_topic
from producers.publisher import (
    H_VALUE_DROPPED,
    KafkaPublisher,
    OutRecord,
    classify,
    publish_error,
    value_dropped,
)
from producers.topics import Topics, ensure_topics
from tests.helpers import event, ingest, produce

DEAD = OutRecord(
    topic="p.events.dlq",
    value=b"v" * 10,
    key=b"k",
    headers=[("trace-id", b"t-1"), ("herald-dlt-reason", b"too_large")],
    reason="too_large",
)
PLAIN = OutRecord(topic="p.deliveries.email", value=b"{}", key=b"u")


def err(code: int, fatal: bool = False) -> KafkaError:
    return KafkaError(code, "broker says no", fatal=fatal)


@pytest.mark.parametrize(
    "code",
    [KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError.TOPIC_AUTHORIZATION_FAILED],
)
def test_unknown_or_forbidden_topic_is_misconfigured(code: int) -> None:
    for rec in (PLAIN, DEAD):
        exc = classify(rec, err(code))
        assert isinstance(exc, BrokerMisconfigured)
        assert exc.hint == "create the topic or grant the producer WRITE on it"
        assert rec.topic in str(exc)


@pytest.mark.parametrize("code", [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE])
def test_too_large_is_misconfigured_with_the_limit_to_raise(code: int) -> None:
    exc = classify(PLAIN, err(code))
    assert isinstance(exc, BrokerMisconfigured)
    assert "raise message.max.bytes" in exc.hint
    assert "\n" not in str(exc)


@pytest.mark.parametrize("code", [KafkaError.INVALID_RECORD, KafkaError.INVALID_TIMESTAMP])
def test_records_the_broker_refuses_are_misconfigured(code: int) -> None:
    assert isinstance(classify(PLAIN, err(code)), BrokerMisconfigured)


@pytest.mark.parametrize(
    "code", [KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError.NOT_LEADER_FOR_PARTITION]
)
def test_passing_errors_stay_unavailable(code: int) -> None:
    assert type(classify(PLAIN, err(code))) is BrokerUnavailable


def test_a_fatal_producer_error_is_fatal() -> None:
    assert isinstance(classify(PLAIN, err(KafkaError._FATAL, fatal=True)), FatalBrokerError)


def test_the_most_severe_failure_decides() -> None:
    timed_out = (PLAIN, err(KafkaError._MSG_TIMED_OUT))
    no_topic = (PLAIN, err(KafkaError.UNKNOWN_TOPIC_OR_PART))
    fatal = (PLAIN, err(KafkaError._FATAL, fatal=True))
    assert type(publish_error([timed_out, timed_out])) is BrokerUnavailable
    assert isinstance(publish_error([timed_out, no_topic]), BrokerMisconfigured)
    assert isinstance(publish_error([timed_out, no_topic, fatal]), FatalBrokerError)


def test_value_dropped_keeps_everything_but_the_value() -> None:
    shrunk = value_dropped(DEAD)
    assert shrunk.value is None
    assert (shrunk.topic, shrunk.key, shrunk.reason) == (DEAD.topic, DEAD.key, DEAD.reason)
    assert shrunk.headers == [*DEAD.headers, (H_VALUE_DROPPED, b"true")]


def test_a_record_refused_inside_produce_raises_a_herald_error_not_kafka_exception() -> None:
    """librdkafka refuses it before any connection, so a closed port is enough."""
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", metrics_port=-1)
    pub = KafkaPublisher(settings, flush_timeout=5)
    try:
        with pytest.raises(BrokerMisconfigured, match="message.max.bytes"):
            pub.publish([OutRecord(topic="p.deliveries.email", value=b"x" * 1_100_000)])
    finally:
        pub.close()


# Integration: the embedded broker and PostgreSQL.

KEY = b"near-1mb"
# Fits message.max.bytes by itself (<= 999,956 with this key), not with the dead-letter headers.
NEAR_1MB = 999_900


def near_1mb_event(user: str) -> bytes:
    base = json.dumps(event(user_id=user, body="")).encode()
    padded = json.dumps(event(user_id=user, body="x" * (NEAR_1MB - len(base)))).encode()
    assert len(padded) == NEAR_1MB
    return padded


@pytest.mark.integration
def test_dead_letter_too_large_for_the_broker_lands_without_its_value(
    settings: Settings, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    user = f"big-{uuid.uuid4().hex[:8]}"
    good = [event(user_id=user, title=f"fine {i}") for i in range(4)]
    values: list[dict[str, Any] | bytes] = [good[0], good[1], near_1mb_event(user), good[2], good[3]]
    positions = produce(settings, values, key=KEY, headers=[("trace-id", b"t-1")])
    assert len({p for _, p, _ in positions}) == 1
    group = f"g-{uuid.uuid4().hex[:8]}"
    run = ingest(settings, positions, group=group)

    topics = Topics(settings.topic_prefix)
    big = next(r for r in read_topic(settings, topics.events) if len(r.value or b"") == NEAR_1MB)
    dlq = read_topic(settings, topics.events_dlq)
    assert len(dlq) == 1
    dead = dlq[0]
    assert dead.value is None
    assert dead.key == KEY
    assert dead.headers[H_VALUE_DROPPED] == b"true"
    assert dead.headers["trace-id"] == b"t-1"
    h = decode_headers(dead.headers)
    assert (h[H_TOPIC], h[H_PARTITION], h[H_OFFSET]) == (topics.events, big.partition, big.offset)
    assert h[H_REASON] == "too_large"

    titles = {str(r[0]) for r in db.execute("SELECT title FROM notifications WHERE user_id = %s", (user,))}
    assert titles == {f"fine {i}" for i in range(4)}
    assert run.handler.totals.invalid == 1
    part = (topics.events, big.partition)
    assert committed(settings, group, [part])[part] == max(o for _, _, o in positions) + 1


@pytest.mark.integration
def test_dead_letter_of_an_old_record_is_stamped_now(settings: Settings) -> None:
    old = int(time.time() * 1000) - 30 * 24 * 3600 * 1000  # a replay of 30-day-old events
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.ingest_topics())
    pub = KafkaPublisher(settings)
    try:
        positions = pub.publish([OutRecord(topic=topics.events, value=b"{not json", timestamp_ms=old)])
    finally:
        pub.close()
    before = int(time.time() * 1000)
    ingest(settings, positions)

    (original,) = read_topic(settings, topics.events)
    assert original.timestamp_ms == old
    (dead,) = read_topic(settings, topics.events_dlq)
    assert dead.timestamp_ms >= before - 1000, "the dead letter kept the old time: retention would drop it"
    assert decode_headers(dead.headers)[H_TIMESTAMP] == old
