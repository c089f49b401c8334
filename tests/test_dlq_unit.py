"""Dead-letter records: the message header stays valid UTF-8, the record is stamped when published (pure)."""

from __future__ import annotations

from confluent_kafka import TIMESTAMP_CREATE_TIME, Message

from consumers.dlq import H_MESSAGE, H_TIMESTAMP, MESSAGE_LIMIT, dead_letter, decode_headers, utf8_cut
from core.errors import SchemaViolation

ORIGINAL_TS = 1_500_000_000_000  # 2017: an old record, replayed


def record(**fields: object) -> Message:
    values: dict[str, object] = {
        "topic": "p.events",
        "partition": 3,
        "offset": 41,
        "key": b"k",
        "value": b"{}",
        "headers": [("trace-id", b"t-1")],
        "timestamp": (TIMESTAMP_CREATE_TIME, ORIGINAL_TS),
    }
    values.update(fields)
    return Message(**values)  # type: ignore[arg-type]


def test_cut_never_splits_a_character() -> None:
    # 3999 ASCII bytes, then 3-byte characters: byte 4000 falls inside the first of them.
    text = "a" * 3999 + "€" * 10
    cut = utf8_cut(text, MESSAGE_LIMIT)
    assert len(cut) == 3999
    assert cut.decode("utf-8") == "a" * 3999


def test_cut_keeps_whole_multibyte_characters_up_to_the_limit() -> None:
    for pad in range(4):  # every alignment of 4-byte characters against the limit
        text = "x" * pad + "😀" * 1200
        cut = utf8_cut(text, MESSAGE_LIMIT)
        assert len(cut) <= MESSAGE_LIMIT
        assert len(cut) > MESSAGE_LIMIT - 4
        assert text.startswith(cut.decode("utf-8"))


def test_short_messages_and_lone_surrogates_are_encodable() -> None:
    assert utf8_cut("schema: title missing", MESSAGE_LIMIT) == b"schema: title missing"
    assert utf8_cut("bad \ud800 char", MESSAGE_LIMIT).decode("utf-8") == "bad ? char"


def test_dead_letter_message_header_is_valid_utf8_after_the_cut() -> None:
    exc = SchemaViolation("ü" * 2500)  # 5000 bytes: over the limit, cut between two bytes
    dead = dead_letter(record(), "p.events.dlq", exc, exc.reason)
    raw = dict(dead.headers)[H_MESSAGE]
    assert isinstance(raw, bytes)
    assert len(raw) <= MESSAGE_LIMIT
    assert raw.decode("utf-8") == "ü" * (MESSAGE_LIMIT // 2)


def test_dead_letter_is_stamped_by_the_producer_and_keeps_the_original_time() -> None:
    exc = SchemaViolation("no title")
    dead = dead_letter(record(), "p.events.dlq", exc, exc.reason)
    assert dead.timestamp_ms is None  # the producer stamps it now: retention counts from the failure
    headers = {k: v for k, v in dead.headers if isinstance(v, bytes)}
    assert decode_headers(headers)[H_TIMESTAMP] == ORIGINAL_TS
