"""Poison records: every malformed kind lands on <prefix>.events.dlq, and the partition moves on.

One partition (a fixed record key) carries good and poison records interleaved; one ingest
run processes them all, and the tests assert on what the run left behind.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from config.settings import Settings
from consumers.dlq import (
    H_FQCN,
    H_MESSAGE,
    H_OFFSET,
    H_PARTITION,
    H_REASON,
    H_TIMESTAMP,
    H_TOPIC,
    decode_headers,
)
from herald.inspect import Record, committed, read_topic
from herald.processes import IngestRun
from producers.publisher import KafkaPublisher, OutRecord
from producers.topics import Topics, ensure_topics
from tests.helpers import event, ingest, make_settings

if TYPE_CHECKING:
    from tests.conftest import Backend

pytestmark = pytest.mark.integration

KEY = b"poison-partition"
HEADERS = [("trace-id", b"trace-123"), ("content-type", b"application/json")]
MAX_BYTES = 256


def _value(v: dict[str, Any] | bytes) -> bytes:
    return v if isinstance(v, bytes) else json.dumps(v).encode()


# kind -> (value, reason header, exception class, a word the message must contain)
POISON: dict[str, tuple[bytes | None, str, str, str]] = {
    "tombstone": (None, "not_json", "core.errors.NotJson", "no value"),
    "not_json": (b"{this is not json", "not_json", "core.errors.NotJson", "JSON"),
    "list": (b"[1,2]", "not_object", "core.errors.NotAnObject", "object"),
    "string": (b'"str"', "not_object", "core.errors.NotAnObject", "object"),
    "missing_title": (_value(event(title=None)), "schema", "core.errors.SchemaViolation", "title"),
    "bad_severity": (_value(event(severity="fatal")), "schema", "core.errors.SchemaViolation", "severity"),
    "http_target_url": (
        _value(event(target_url="http://x")),
        "schema",
        "core.errors.SchemaViolation",
        "target_url",
    ),
    "too_large": (
        _value(event(body="x" * (MAX_BYTES + 10))),
        "too_large",
        "core.errors.TooLarge",
        str(MAX_BYTES),
    ),
}


@dataclass
class Outcome:
    settings: Settings
    topics: Topics
    # kind -> the original record on the events topic
    originals: dict[str, Record]
    dlq: list[Record]
    good_ids: list[str]
    stored_ids: set[str]
    committed: dict[tuple[str, int], int]
    partition: int
    last_offset: int
    run: IngestRun

    def dead(self, kind: str) -> Record:
        original = self.originals[kind]
        matches = [r for r in self.dlq if decode_headers(r.headers).get(H_OFFSET) == original.offset]
        assert len(matches) == 1, f"{kind}: {len(matches)} dead letters"
        return matches[0]


@pytest.fixture(scope="module")
def outcome(backend: Backend) -> Iterator[Outcome]:
    settings = make_settings(backend.bootstrap, backend.database_url).model_copy(
        update={"max_event_bytes": MAX_BYTES}
    )
    topics = Topics(settings.topic_prefix)
    user = f"poison-{uuid.uuid4().hex[:8]}"
    # good, poison, good, poison, ..., good: each poison record is followed by a good one
    values: list[bytes | None] = []
    kinds: list[str | None] = []
    good_ids: list[str] = []
    for kind in [*POISON, None]:
        good = event(user_id=user)
        good_ids.append(good["id"])
        values.append(_value(good))
        kinds.append(None)
        if kind is not None:
            values.append(POISON[kind][0])
            kinds.append(kind)
    assert all(len(v or b"") < MAX_BYTES for v, k in zip(values, kinds, strict=True) if k is None)
    ensure_topics(settings, topics.ingest_topics())
    pub = KafkaPublisher(settings)
    try:
        positions = pub.publish(
            [OutRecord(topic=topics.events, value=v, key=KEY, headers=HEADERS) for v in values]
        )
    finally:
        pub.close()
    assert len({p for _, p, _ in positions}) == 1
    group = f"g-{uuid.uuid4().hex[:8]}"
    run = ingest(settings, positions, group=group)
    events = {r.offset: r for r in read_topic(settings, topics.events)}
    originals = {k: events[off] for k, (_, _, off) in zip(kinds, positions, strict=True) if k is not None}
    dlq = read_topic(settings, topics.events_dlq)
    partition = positions[0][1]
    with psycopg.connect(backend.database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT source, idempotency_key FROM notifications WHERE user_id = %s", (user,)
        ).fetchall()
    # Keys are s:<len>:<source>:<id>, the source being the stable default ("events").
    stored = {
        str(key).removeprefix(f"s:{len(settings.default_source)}:{settings.default_source}:")
        for _, key in rows
    }
    yield Outcome(
        settings=settings,
        topics=topics,
        originals=originals,
        dlq=dlq,
        good_ids=good_ids,
        stored_ids=stored,
        committed=committed(settings, group, [(topics.events, partition)]),
        partition=partition,
        last_offset=max(off for _, _, off in positions),
        run=run,
    )


@pytest.mark.parametrize("kind", list(POISON))
def test_poison_record_is_dead_lettered_with_its_original_record(outcome: Outcome, kind: str) -> None:
    original = outcome.originals[kind]
    dead = outcome.dead(kind)
    assert original.value == POISON[kind][0]
    assert dead.key == KEY
    assert dead.value == original.value, (
        f"BUG: the dead letter's value is {dead.value!r}, the original record's {original.value!r}"
    )
    for name, value in HEADERS:
        assert dead.headers.get(name) == value, name
    # Stamped when dead-lettered, so retention counts from then (the original time is a header).
    assert dead.timestamp_ms >= original.timestamp_ms


@pytest.mark.parametrize("kind", list(POISON))
def test_dead_letter_headers_say_where_from_and_why(outcome: Outcome, kind: str) -> None:
    _, reason, fqcn, word = POISON[kind]
    original = outcome.originals[kind]
    raw = outcome.dead(kind).headers
    assert len(raw[H_PARTITION]) == 4
    assert len(raw[H_OFFSET]) == 8 and len(raw[H_TIMESTAMP]) == 8
    h = decode_headers(raw)
    assert h[H_TOPIC] == outcome.topics.events
    assert h[H_PARTITION] == original.partition == outcome.partition
    assert h[H_OFFSET] == original.offset
    assert h[H_TIMESTAMP] == original.timestamp_ms > 0
    assert h[H_FQCN] == fqcn
    assert word in str(h[H_MESSAGE])
    assert h[H_REASON] == reason


def test_exactly_one_dead_letter_per_poison_record(outcome: Outcome) -> None:
    assert len(outcome.dlq) == len(POISON)
    assert outcome.run.handler.totals.invalid == len(POISON)


def test_good_records_around_the_poison_are_processed(outcome: Outcome) -> None:
    assert outcome.stored_ids == set(outcome.good_ids)
    assert outcome.run.handler.totals.inserted == len(outcome.good_ids)


def test_offset_is_committed_past_the_last_record(outcome: Outcome) -> None:
    assert outcome.committed[(outcome.topics.events, outcome.partition)] == outcome.last_offset + 1
