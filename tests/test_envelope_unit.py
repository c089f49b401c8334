"""The native envelope: validation, the idempotency-key chain, summaries and fan-out (pure)."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from core.envelope import (
    BYTE_LIMITS,
    NOTIFICATION_NS,
    Envelope,
    content_key,
    default_summary,
    expand,
    from_object,
    idempotency_key,
    parse,
)
from core.errors import InvalidEvent, NotAnObject, NotJson, SchemaViolation, TooLarge
from core.redaction import redact

RECORD_TIME = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def raw(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "evt-1",
        "type": "invoice.payment_failed",
        "title": "Payment failed",
        "user_id": "u1",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def parsed(**fields: Any) -> Envelope:
    return parse(json.dumps(raw(**fields)).encode(), max_bytes=1_000_000)


def rejected(value: dict[str, Any] | bytes, max_bytes: int = 1_000_000) -> InvalidEvent:
    data = value if isinstance(value, bytes) else json.dumps(value).encode()
    with pytest.raises(InvalidEvent) as info:
        parse(data, max_bytes=max_bytes)
    return info.value


# --- validation -----------------------------------------------------------------------------------


def test_minimal_event_gets_documented_defaults() -> None:
    env = parsed()
    assert env.severity == "info"
    assert env.sensitive is False
    assert env.source is None and env.body is None and env.data is None and env.occurred_at is None


@pytest.mark.parametrize("missing", ["id", "type", "title"])
def test_missing_required_field_is_a_schema_violation(missing: str) -> None:
    exc = rejected(raw(**{missing: None}))
    assert isinstance(exc, SchemaViolation)
    assert exc.reason == "schema"
    assert missing in str(exc)


@pytest.mark.parametrize("severity", ["fatal", "CRITICAL", "", 3])
def test_bad_severity_is_rejected(severity: object) -> None:
    exc = rejected(raw(severity=severity))
    assert isinstance(exc, SchemaViolation)
    assert "severity" in str(exc)


@pytest.mark.parametrize("severity", ["info", "success", "warning", "critical"])
def test_every_documented_severity_is_accepted(severity: str) -> None:
    assert parsed(severity=severity).severity == severity


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/x",
        "http://",
        "javascript:alert(1)",
        "//evil.com/path",
        "https://",
        "ftp://example.com",
        "data:text/html,<b>x</b>",
        "relative/no-leading-slash",
        "HTTP://example.com",
    ],
)
def test_target_url_must_be_relative_or_https(url: str) -> None:
    exc = rejected(raw(target_url=url))
    assert isinstance(exc, SchemaViolation)
    assert "target_url" in str(exc)


def test_target_url_rejects_paths_browsers_read_as_another_host() -> None:
    """BUG (core/envelope.py, Envelope._relative_or_https): browsers turn ``\\`` into ``/``
    and strip tab/newline in URLs, so ``/\\evil.com`` and ``/<TAB>/evil.com`` open evil.com:
    an open redirect in every email and push link. The validator must reject them too."""
    accepted = []
    for url in ["/\\evil.com", "/\\/evil.com", "/\t/evil.com", "/\n/evil.com", "/\r//evil.com"]:
        try:
            parse(json.dumps(raw(target_url=url)).encode(), max_bytes=1_000_000)
        except SchemaViolation:
            continue
        accepted.append(url)
    assert accepted == [], f"BUG: target_url accepted though a browser opens evil.com for it: {accepted}"


@pytest.mark.parametrize("url", ["/invoices/42", "/", "/a?b=c#d", "https://app.example.com/x"])
def test_target_url_relative_or_https_is_kept(url: str) -> None:
    assert parsed(target_url=url).target_url == url


def test_title_longer_than_200_is_rejected_and_200_is_accepted() -> None:
    assert parsed(title="t" * 200).title == "t" * 200
    exc = rejected(raw(title="t" * 201))
    assert isinstance(exc, SchemaViolation)
    assert "title" in str(exc)


def test_body_and_summary_limits() -> None:
    assert parsed(body="b" * 10_000).body == "b" * 10_000
    assert isinstance(rejected(raw(body="b" * 10_001)), SchemaViolation)
    assert isinstance(rejected(raw(summary="s" * 281)), SchemaViolation)


def test_unknown_fields_are_ignored_not_rejected() -> None:
    env = parsed(unknown_field={"nested": [1, 2]}, another=7)
    assert env.id == "evt-1"
    assert not hasattr(env, "unknown_field")


def test_recipients_empty_list_is_rejected() -> None:
    exc = rejected(raw(user_id=None, recipients=[]))
    assert isinstance(exc, SchemaViolation)
    assert "recipients" in str(exc)


def test_recipients_with_a_blank_entry_is_rejected() -> None:
    assert isinstance(rejected(raw(user_id=None, recipients=["a", ""])), SchemaViolation)


def test_user_id_or_recipients_is_required() -> None:
    exc = rejected(raw(user_id=None))
    assert isinstance(exc, SchemaViolation)
    assert "user_id or recipients" in str(exc)
    assert parsed(user_id=None, recipients=["a"]).recipients == ["a"]


def test_occurred_at_must_carry_an_offset() -> None:
    assert parsed(occurred_at="2030-01-01T10:00:00Z").occurred_at == datetime(2030, 1, 1, 10, tzinfo=UTC)
    assert isinstance(rejected(raw(occurred_at="2030-01-01T10:00:00")), SchemaViolation)


def test_data_must_be_an_object() -> None:
    assert isinstance(rejected(raw(data=[1, 2])), SchemaViolation)


@pytest.mark.parametrize("value", [b"{not json", b"", b"\xff\xfe"])
def test_not_json(value: bytes) -> None:
    exc = rejected(value)
    assert isinstance(exc, NotJson)
    assert exc.reason == "not_json"


def test_no_value_at_all_is_not_json() -> None:
    with pytest.raises(NotJson):
        parse(None, max_bytes=100)


@pytest.mark.parametrize("value", [b"[1,2]", b'"str"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object(value: bytes) -> None:
    exc = rejected(value)
    assert isinstance(exc, NotAnObject)
    assert exc.reason == "not_object"


def test_size_limit_is_checked_before_parsing() -> None:
    value = json.dumps(raw()).encode()
    assert parse(value, max_bytes=len(value)).id == "evt-1"
    exc = rejected(value, max_bytes=len(value) - 1)
    assert isinstance(exc, TooLarge)
    assert exc.reason == "too_large"
    # Even garbage is reported as too large first: nothing oversized is ever parsed.
    assert isinstance(rejected(b"x" * 300, max_bytes=256), TooLarge)


def test_nul_character_is_a_schema_violation() -> None:
    """PostgreSQL stores NUL in neither text nor jsonb: reject it here, not in the database."""
    for fields in ({"title": "a\x00b"}, {"data": {"k": "v\x00"}}, {"body": "\x00"}):
        exc = rejected(raw(**fields))
        assert isinstance(exc, SchemaViolation), fields
        assert "NUL" in str(exc)


def test_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    """BUG (core/envelope.py, parse): the NUL check looks for the bytes ``\\u0000`` anywhere,
    so the JSON text ``"C:\\\\u0000"`` (a backslash, then "u0000": no NUL at all) is dead-lettered.
    Only an odd run of backslashes before ``u0000`` is a NUL escape."""
    value = json.dumps(raw(title="a literal \\u0000 in text")).encode()
    assert b"\\\\u0000" in value
    try:
        env = parse(value, max_bytes=1_000_000)
    except SchemaViolation as exc:
        pytest.fail(f"BUG: an event without any NUL was rejected: {exc}")
    assert env.title == "a literal \\u0000 in text"


# --- the idempotency-key chain ---------------------------------------------------------------------


def test_key_explicit_idempotency_key_wins() -> None:
    env = parsed(idempotency_key="k-1", resource_id="inv-9", source="billing")
    assert idempotency_key(env, "billing") == "k:k-1"


def test_key_type_and_resource_when_there_is_a_resource_id() -> None:
    env = parsed(resource_id="inv-9")
    assert idempotency_key(env, "billing") == "r:22:invoice.payment_failed:inv-9"
    # The seed's rule: the same invoice failing twice (two event ids) is one notification.
    other = parsed(id="evt-2", resource_id="inv-9")
    assert idempotency_key(other, "billing") == idempotency_key(env, "billing")


def test_key_source_and_id_otherwise() -> None:
    env = parsed()
    assert idempotency_key(env, "billing") == "s:7:billing:evt-1"


def test_key_parts_are_unambiguous() -> None:
    """``a:b`` + ``c`` must not equal ``a`` + ``b:c``, in either two-part tier."""
    assert idempotency_key(parsed(type="a:b", resource_id="c"), "s") != idempotency_key(
        parsed(type="a", resource_id="b:c"), "s"
    )
    assert idempotency_key(parsed(id="c"), "a:b") != idempotency_key(parsed(id="b:c"), "a")


def test_an_explicit_key_never_equals_another_events_derived_key() -> None:
    derived = idempotency_key(parsed(), "billing")  # s:7:billing:evt-1
    forged = parsed(id="other", idempotency_key=derived)
    assert idempotency_key(forged, "billing") != derived
    by_resource = idempotency_key(parsed(resource_id="inv-9"), "billing")
    assert idempotency_key(parsed(idempotency_key=by_resource), "billing") != by_resource


def test_a_content_key_is_its_own_tier() -> None:
    value_key = content_key(b'{"legacy": true}')
    explicit = parsed(idempotency_key=value_key)
    assert idempotency_key(explicit, "s") != idempotency_key(explicit, "s", content_keyed=True)
    assert idempotency_key(explicit, "s", content_keyed=True).startswith("h:sha256:")


def test_key_source_defaults_to_a_stable_name_not_the_topic() -> None:
    [n] = expand(parsed(), default_source="events", record_time=RECORD_TIME)
    assert n.source == "events"
    assert n.idempotency_key == "s:6:events:evt-1"
    [m] = expand(parsed(source="billing"), default_source="events", record_time=RECORD_TIME)
    assert m.idempotency_key == "s:7:billing:evt-1"


def test_content_key_is_sha256_of_the_value() -> None:
    value = b'{"legacy": true}'
    assert content_key(value) == "sha256:" + hashlib.sha256(value).hexdigest()
    assert content_key(value) != content_key(value + b" ")


def test_notification_id_is_deterministic_per_user_and_key() -> None:
    [a] = expand(parsed(), default_source="s", record_time=RECORD_TIME)
    [b] = expand(parsed(title="changed"), default_source="s", record_time=None)
    assert a.id == b.id == uuid.uuid5(NOTIFICATION_NS, "u1\x00s:1:s:evt-1")


# --- summary ---------------------------------------------------------------------------------------


def test_summary_defaults_to_the_start_of_the_body() -> None:
    env = parsed(body="Your  card\nwas declined.")
    assert default_summary(env, 280) == "Your card was declined."


def test_summary_default_is_cut_to_the_limit_with_an_ellipsis() -> None:
    env = parsed(body="word " * 200)
    out = default_summary(env, 280)
    assert out is not None
    assert len(out) <= 280
    assert out.endswith("\u2026")


def test_sensitive_body_gives_no_default_summary() -> None:
    env = parsed(body="Your diagnosis is ...", sensitive=True)
    assert default_summary(env, 280) is None
    [n] = expand(env, default_source="s", record_time=RECORD_TIME)
    assert n.summary is None
    assert n.body == "Your diagnosis is ..."  # stored in-app, only never sent out


def test_explicit_summary_is_kept_even_when_sensitive() -> None:
    env = parsed(body="secret", summary="You have a new message", sensitive=True)
    assert default_summary(env, 280) == "You have a new message"


def test_no_body_no_summary() -> None:
    assert default_summary(parsed(), 280) is None


# --- expand ----------------------------------------------------------------------------------------


def test_expand_fans_out_recipients_with_distinct_ids() -> None:
    env = parsed(user_id=None, recipients=["a", "b", "c", "b"], resource_id="r1")
    notes = expand(env, default_source="s", record_time=RECORD_TIME)
    assert [n.user_id for n in notes] == ["a", "b", "c"]
    assert len({n.id for n in notes}) == 3
    assert [n.idempotency_key for n in notes] == ["r:22:invoice.payment_failed:r1"] * 3


def test_expand_explicit_key_is_shared_but_ids_differ_per_recipient() -> None:
    env = parsed(user_id=None, recipients=["a", "b"], idempotency_key="k")
    a, b = expand(env, default_source="s", record_time=RECORD_TIME)
    assert a.idempotency_key == b.idempotency_key == "k:k"
    assert a.id != b.id


def test_expand_occurred_at_falls_back_to_the_record_time() -> None:
    [n] = expand(parsed(), default_source="s", record_time=RECORD_TIME)
    assert n.occurred_at == RECORD_TIME
    when = "2029-05-05T05:05:05+02:00"
    [m] = expand(parsed(occurred_at=when), default_source="s", record_time=RECORD_TIME)
    assert m.occurred_at == datetime.fromisoformat(when)


def test_expand_copies_the_fields_and_marks_external_severities() -> None:
    env = parsed(
        severity="warning",
        category="billing",
        target_url="/i/1",
        batch_key="bk",
        data={"amount": 5},
        body="b",
    )
    [n] = expand(env, default_source="s", record_time=RECORD_TIME)
    assert (n.severity, n.category, n.target_url, n.batch_key, n.data, n.body) == (
        "warning",
        "billing",
        "/i/1",
        "bk",
        {"amount": 5},
        "b",
    )
    assert n.external
    [i] = expand(parsed(severity="success"), default_source="s", record_time=RECORD_TIME)
    assert not i.external


# --- what PostgreSQL can store: bytes, not characters ----------------------------------------------


def test_id_and_key_limits_are_in_utf8_bytes() -> None:
    parsed(user_id="u" * 200)  # 200 bytes: fine
    with pytest.raises(SchemaViolation, match="user_id is 600 bytes"):
        parsed(user_id="\u20ac" * 200)  # 200 characters, 600 bytes
    with pytest.raises(SchemaViolation, match="idempotency_key is 1500 bytes"):
        parsed(idempotency_key="\u20ac" * 500)


def test_each_recipient_is_limited() -> None:
    with pytest.raises(SchemaViolation, match="recipients"):
        parsed(user_id=None, recipients=["ok", "x" * 20_000])
    with pytest.raises(SchemaViolation, match="recipients"):
        parsed(user_id=None, recipients=["ok", "\u20ac" * 150])


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_in_data_are_a_schema_violation(number: str) -> None:
    value = b'{"id":"1","type":"t","title":"x","user_id":"u","data":{"a":[1,{"b":%s}]}}' % number.encode()
    with pytest.raises(SchemaViolation, match="non-finite"):
        parse(value, max_bytes=10_000)


@pytest.mark.parametrize(
    "value",
    [
        b'{"id":"1","type":"t","title":"x\\ud800","user_id":"u"}',
        b'{"id":"1","type":"t","title":"x","user_id":"u","data":{"a":"\\udc00"}}',
    ],
)
def test_lone_surrogates_are_a_schema_violation(value: bytes) -> None:
    with pytest.raises(SchemaViolation, match="surrogate|unicode"):
        parse(value, max_bytes=10_000)


def test_lone_surrogates_from_decoded_objects_are_a_schema_violation() -> None:
    """CloudEvents and mapping rules decode with json.loads, which accepts them."""
    obj = json.loads('{"id":"1","type":"t","title":"x","user_id":"u","data":{"\\ud800":1}}')
    with pytest.raises(SchemaViolation, match="surrogate"):
        from_object(obj)
    obj = json.loads('{"id":"1","type":"t","title":"x","user_id":"u\\udfff"}')
    with pytest.raises(SchemaViolation, match="unicode"):
        from_object(obj)


def test_summary_is_redacted_before_it_is_cut() -> None:
    """A card number across the 280-character boundary must not survive as a fragment."""
    body = "x" * 265 + " 4111 1111 1111 1111 declined"  # the cut falls inside the number
    env = parsed(body=body, severity="critical")
    patterns = (r"\b\d(?:[ -]?\d){12,18}\b",)
    summary = default_summary(env, 280, patterns)
    assert summary is not None and "4111" not in summary and "1111" not in summary
    unredacted_cut = default_summary(env, 280)
    assert unredacted_cut is not None and "4111 1111 11" in unredacted_cut  # the hazard is real
    assert redact(unredacted_cut, patterns) == unredacted_cut  # and redacting the cut misses it


def test_every_character_limit_is_within_its_byte_limit() -> None:
    """``check_storable``'s ASCII fast path relies on it: for ASCII, characters are bytes."""
    for name, limit in BYTE_LIMITS.items():
        field = Envelope.model_fields[name]
        max_chars = next(m.max_length for m in field.metadata if hasattr(m, "max_length"))
        assert max_chars <= limit, name


def test_the_ascii_fast_path_still_checks_numbers() -> None:
    with pytest.raises(SchemaViolation, match="non-finite"):
        parse(b'{"id":"1","type":"t","title":"x","user_id":"u","data":{"a":NaN}}', max_bytes=1000)


def test_an_escaped_non_ascii_id_is_held_to_its_byte_limit() -> None:
    value = json.dumps(raw(user_id="\u20ac" * 150)).encode()  # ASCII on the wire, 450 bytes decoded
    assert value.isascii()
    with pytest.raises(SchemaViolation, match="user_id is 450 bytes"):
        parse(value, max_bytes=10_000)


def test_in_app_only_summaries_are_cut_but_not_scanned() -> None:
    env = parsed(body="mail bob@example.com", severity="info")
    assert default_summary(env, 280, (r"\S+@\S+",)) == "mail bob@example.com"
    env = parsed(body="mail bob@example.com", severity="warning")
    assert default_summary(env, 280, (r"\S+@\S+",)) == "mail [redacted]"
