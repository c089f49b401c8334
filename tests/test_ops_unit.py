"""Operator tools without a broker: time parsing, filters, header decoding, where records go."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pytest

from consumers.offsets import Reset, _answer_holds, due_ms, parse_time
from consumers.reading import Record
from consumers.redrive import H_FROM, decoded_headers, matches, moved_record, parse_where, target_of
from core.errors import ConfigError
from herald.ops import normalize_argv
from producers.topics import Topics

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_parse_time_relative_and_rfc3339() -> None:
    assert parse_time("-2h", NOW) == NOW - timedelta(hours=2)
    assert parse_time("-90s", NOW) == NOW - timedelta(seconds=90)
    assert parse_time("-1d", NOW) == NOW - timedelta(days=1)
    assert parse_time("2026-11-25T09:00:00Z", NOW) == datetime(2026, 11, 25, 9, tzinfo=UTC)
    assert parse_time("2026-11-25T10:00:00+01:00", NOW) == datetime(2026, 11, 25, 9, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["yesterday", "2h", "-0h", "-2w", "2026-11-25T09:00:00", ""])
def test_parse_time_refuses_in_one_line(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_time(bad, NOW)
    assert "\n" not in str(err.value) and "--from" in str(err.value)


def test_from_with_a_relative_time_is_not_taken_for_an_option() -> None:
    argv = ["replay", "--group", "g", "--from", "-2h", "--topic", "t"]
    assert normalize_argv(argv) == ["replay", "--group", "g", "--from=-2h", "--topic", "t"]
    assert normalize_argv(["lag", "--json"]) == ["lag", "--json"]


def test_where_filters() -> None:
    assert parse_where(["reason=schema", "topic=herald.events"]) == {
        "reason": "schema",
        "topic": "herald.events",
    }
    for bad in ("reason", "color=red", "reason="):
        with pytest.raises(ValueError, match="reason=X or topic=X"):
            parse_where([bad])
    rec = _record({"herald-dlt-reason": b"schema", "kafka_dlt-original-topic": b"herald.events"})
    assert matches(rec, {"reason": "schema"}) and matches(rec, {})
    assert not matches(rec, {"reason": "not_json"})
    assert not matches(rec, {"reason": "schema", "topic": "other"})


def test_a_retry_topics_dead_letter_goes_back_to_the_channels_main_topic() -> None:
    t = Topics("herald")
    assert target_of(t, "herald.deliveries.webhook.retry.5m") == "herald.deliveries.webhook"
    assert target_of(t, "herald.deliveries.webhook") == "herald.deliveries.webhook"
    assert target_of(t, "herald.events") == "herald.events"
    assert target_of(t, "payments.events") == "payments.events"


def test_binary_headers_decode_by_their_types() -> None:
    headers = {
        "kafka_dlt-original-topic": b"herald.deliveries.webhook",
        "kafka_dlt-original-partition": struct.pack(">i", 3),
        "kafka_dlt-original-offset": struct.pack(">q", 2**40 + 7),
        "kafka_dlt-original-timestamp": struct.pack(">q", 1_795_000_000_123),
        "kafka_dlt-exception-fqcn": b"consumers.deliver.DeliveryFailed",
        "kafka_dlt-exception-message": "HTTP 422 — refusé".encode(),
        "herald-dlt-reason": b"permanent",
        "retry_topic-attempts": struct.pack(">i", 8),
        "retry_topic-backoff-timestamp": b"1795000000999",
        "x-binary": b"\xff\x00",
    }
    got = decoded_headers(headers)
    assert got["kafka_dlt-original-partition"] == 3
    assert got["kafka_dlt-original-offset"] == 2**40 + 7
    assert got["kafka_dlt-original-timestamp"] == 1_795_000_000_123
    assert got["kafka_dlt-exception-message"] == "HTTP 422 — refusé"
    assert got["retry_topic-attempts"] == 8
    assert got["retry_topic-backoff-timestamp"] == "1795000000999"
    assert got["x-binary"] == "0xff00"


def test_a_moved_record_loses_dead_letter_and_retry_headers_and_names_its_origin() -> None:
    rec = _record(
        {
            "herald-delivery-id": b"d1",
            "herald-source": b"stripe",
            "kafka_dlt-original-topic": b"herald.deliveries.webhook.retry.5s",
            "herald-dlt-reason": b"exhausted",
            "retry_topic-attempts": struct.pack(">i", 8),
            "retry_topic-backoff-timestamp": b"1",
            "herald-held": b"circuit-open",
        }
    )
    out = moved_record(rec, "herald.deliveries.webhook", attempts=8)
    names = [k for k, _ in out.headers]
    assert names == ["herald-delivery-id", "herald-source", "retry_topic-attempts", H_FROM]
    assert dict(out.headers)["retry_topic-attempts"] == struct.pack(">i", 8)
    assert dict(out.headers)[H_FROM] == b"herald.deliveries.webhook.dlq:1:42"
    assert (out.topic, out.key, out.value) == ("herald.deliveries.webhook", b"k", b"v")
    assert "retry_topic-attempts" not in [k for k, _ in moved_record(rec, "t", attempts=None).headers]


def test_retry_records_are_late_from_their_due_time() -> None:
    assert due_ms(1000, {}) == 1000
    assert due_ms(1000, {"retry_topic-backoff-timestamp": b"5000"}) == 5000
    assert due_ms(1000, {"retry_topic-backoff-timestamp": b"junk"}) == 1000


def test_reread_counts_only_records_before_the_current_offset() -> None:
    assert Reset("t", 0, current=100, new=40, end=120).reread == 60
    assert Reset("t", 0, current=None, new=40, end=120).reread == 80
    assert Reset("t", 0, current=100, new=100, end=120).reread == 0


def test_the_brokers_time_answer_is_checked_against_the_records() -> None:
    stamps = [10, 20, 30, 40]

    def ts_at(offset: int) -> int | None:
        return stamps[offset] if offset < len(stamps) else None

    assert _answer_holds(ts_at, 0, 4, 2, 25)  # 20 < 25 <= 30
    assert not _answer_holds(ts_at, 0, 4, 0, 25)  # what the embedded broker answers
    assert not _answer_holds(ts_at, 0, 4, 3, 25)  # the one before is late enough already
    assert _answer_holds(ts_at, 0, 4, 4, 50)  # none at or after: the end


def _record(headers: dict[str, bytes]) -> Record:
    return Record("herald.deliveries.webhook.dlq", 1, 42, b"k", b"v", headers, 0)


def test_a_redriven_delivery_counts_its_budget_from_the_redrive() -> None:
    import uuid

    from channels.base import Endpoint, SendResult
    from consumers.deliver import Item, Work, settle

    def work(attempt: int, base: int) -> Work:
        item = Item(None, "t", 0, 0, {}, uuid.uuid4(), attempt - 1, 0)  # type: ignore[arg-type]
        endpoint = Endpoint(1, "u", "http://x", "whsec_x")
        return Work(item, attempt, [endpoint], {}, {1: SendResult("transient", 503)}, budget_base=base)

    assert settle(work(3, 0), 3).reason == "exhausted"
    assert settle(work(4, 3), 3).status == "retrying", "tries before the redrive do not count"
    assert settle(work(5, 3), 3).status == "retrying"
    assert settle(work(6, 3), 3).reason == "exhausted", "the whole budget again, then no more"
