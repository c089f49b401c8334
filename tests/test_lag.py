"""``herald lag``: exact records and seconds (one record per batch, DESIGN.md), 0 when
caught up, and retry records late only from their due time."""

from __future__ import annotations

import json
import time

import pytest

from config.settings import Settings
from consumers.offsets import lag
from producers.topics import Topics, ensure_topics
from tests.ops_support import new_group, produce_single, run, set_offsets

pytestmark = pytest.mark.integration


def test_lag_in_records_and_seconds_then_zero_when_caught_up(settings: Settings) -> None:
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, [topics.events])
    now = int(time.time() * 1000)
    stamps = [now - 100_000, now - 90_000, now - 80_000, now - 70_000, now - 60_000]
    offsets = produce_single(settings, topics.events, [b"{}"] * 5, timestamps_ms=stamps)
    assert offsets == [0, 1, 2, 3, 4]
    group = new_group("lag")
    set_offsets(settings, group, {(topics.events, 0): 2})

    rows = {(r.topic, r.partition): r for r in lag(settings, [group])}
    row = rows[(topics.events, 0)]
    assert (row.committed, row.end, row.lag) == (2, 5, 3)
    assert 80 <= row.lag_seconds < 90, "the age of the oldest unread record (offset 2, 80 s old)"
    assert (topics.events, 1) not in rows, "a group that is not herald's shows what it committed"

    set_offsets(settings, group, {(topics.events, 0): 5})
    row = {(r.topic, r.partition): r for r in lag(settings, [group])}[(topics.events, 0)]
    assert (row.committed, row.end, row.lag, row.lag_seconds) == (5, 5, 0, 0)


def test_a_retry_record_is_late_only_once_due(settings: Settings) -> None:
    topics = Topics(settings.topic_prefix)
    retry = topics.retry("webhook", "5m")
    ensure_topics(settings, [retry])
    now = int(time.time() * 1000)
    due = [("retry_topic-backoff-timestamp", str(now + 300_000).encode())]
    past = [("retry_topic-backoff-timestamp", str(now - 30_000).encode())]
    produce_single(settings, retry, [b"a", b"b"], timestamps_ms=[now - 200_000] * 2, headers=[due, due])
    produce_single(settings, retry, [b"c"], timestamps_ms=[now - 200_000], headers=[past], partition=1)
    group = new_group("lag-retry")
    set_offsets(settings, group, {(retry, 0): 0, (retry, 1): 0})

    rows = {r.partition: r for r in lag(settings, [group])}
    assert (rows[0].lag, rows[0].lag_seconds) == (2, 0), "waiting for its tier is not lag"
    assert rows[1].lag == 1 and 30 <= rows[1].lag_seconds < 40, "late from its due time, not its timestamp"


def test_lag_json_through_the_command_and_one_line_errors(settings: Settings) -> None:
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, [topics.events])
    produce_single(settings, topics.events, [b"{}"] * 3)
    group = new_group("lag-cli")
    set_offsets(settings, group, {(topics.events, 0): 1})

    done = run(settings, "lag", "--group", group, "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert all(
        set(r) == {"group", "topic", "partition", "committed", "end", "lag", "lag_seconds"} for r in rows
    )
    mine = [r for r in rows if r["topic"] == topics.events and r["partition"] == 0]
    assert [(r["group"], r["committed"], r["end"], r["lag"]) for r in mine] == [(group, 1, 3, 2)]

    table = run(settings, "lag", "--group", group)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == [
        "group",
        "topic",
        "partition",
        "committed",
        "end",
        "lag",
        "lag_seconds",
    ]

    unknown = run(settings, "lag", "--group", "no-such-group-at-all")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [unknown.stderr.strip()]
    assert "unknown consumer group 'no-such-group-at-all'" in unknown.stderr

    down = run(settings, "lag", HERALD_KAFKA_BOOTSTRAP="127.0.0.1:1")
    assert down.returncode == 1
    # Why depends on which call found the broker gone first: no answer, or librdkafka's reason.
    assert down.stderr.strip().splitlines() == [down.stderr.strip()]
    assert down.stderr.startswith("herald: the broker at 127.0.0.1:1 is unreachable: ")
    assert "KafkaError{" not in down.stderr
