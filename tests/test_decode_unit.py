"""Decoding one record: native, CloudEvents (both modes), mapping rules, unmapped (pure)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from consumers.decode import Decoder
from consumers.paths import MISSING, compile_path, resolve
from consumers.rules import RuleSet
from core.envelope import content_key, expand
from core.errors import InvalidEvent, MappingFailed, NoRecipients, NotAnObject, SchemaViolation, Unmapped

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "samples"
SHIPPED = ROOT / "config" / "rules"
TOPIC = "herald.events"


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def native(**fields: Any) -> dict[str, Any]:
    return {"id": "e1", "type": "t.x", "title": "Hello", "user_id": "u1", **fields}


def rules(text: str) -> RuleSet:
    import tomllib

    return RuleSet.from_data(tomllib.loads(text))


def rejected(decoder: Decoder, value: bytes, headers: Any = None, topic: str = TOPIC) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        decoder(value, headers, topic)
    return info.value


# --- paths ------------------------------------------------------------------------------------------


def test_paths_read_keys_and_indexes() -> None:
    doc = {"a": {"b": [{"c": 1}, {"c": 2}]}, "n": None}
    assert resolve(doc, compile_path("a.b[1].c")) == 2
    assert resolve(doc, compile_path("$.a.b[0].c")) == 1
    assert resolve(doc, compile_path("a.b[5].c")) is MISSING
    assert resolve(doc, compile_path("a.x")) is MISSING
    assert resolve(doc, compile_path("n")) is MISSING  # null counts as missing
    assert resolve(doc, compile_path("a.b.c")) is MISSING  # a list is not an object


@pytest.mark.parametrize("bad", ["", "a..b", "a.[0]", "a[x]", "$.", "a b.c[", "a]"])
def test_bad_paths_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        compile_path(bad)


# --- native and the no-rules default --------------------------------------------------------------


def test_native_without_rules_is_the_old_parse() -> None:
    d = Decoder(max_bytes=10_000)
    out = d(js(native()), None, TOPIC)
    assert out.via == "native" and out.envelopes[0].title == "Hello" and not out.content_keyed
    assert rejected(d, js(native(title=None))).reason == "schema"
    assert rejected(d, js({"some": "thing"})).reason == "schema"  # no rules: everything is native


def test_with_rules_an_unmatched_foreign_object_is_unmapped() -> None:
    d = Decoder(max_bytes=10_000, rules=RuleSet.load(SHIPPED))
    err = rejected(d, js({"kind": "something.else", "payload": {}}))
    assert isinstance(err, Unmapped) and err.reason == "unmapped"
    assert "missing id, type, title, user_id/recipients" in err.message


def test_with_rules_a_native_looking_object_stays_native() -> None:
    d = Decoder(max_bytes=10_000, rules=RuleSet.load(SHIPPED))
    assert d(js(native()), None, TOPIC).via == "native"
    # every native key present but a bad value: a schema violation, not unmapped
    assert rejected(d, js(native(severity="fatal"))).reason == "schema"
    assert rejected(d, b"[1]").reason == "not_object"
    assert rejected(d, b"{nope").reason == "not_json"


# --- CloudEvents ----------------------------------------------------------------------------------

CE = {"specversion": "1.0", "id": "ce-1", "source": "/billing", "type": "com.acme.invoice.failed"}
STRUCTURED = [("content-type", b"application/cloudevents+json; charset=utf-8")]


def binary_headers(**attrs: str) -> list[tuple[str, bytes]]:
    base = {**{k: str(v) for k, v in CE.items()}, **attrs}
    return [(f"ce_{k}", v.encode()) for k, v in base.items()] + [("content-type", b"application/json")]


def test_structured_cloudevent_maps_attributes_and_subject() -> None:
    value = js({**CE, "time": "2030-01-02T03:04:05Z", "subject": "u-9", "data": {"title": "Failed"}})
    out = Decoder(max_bytes=10_000)(value, STRUCTURED, TOPIC)
    env = out.envelopes[0]
    assert out.via == "cloudevent"
    assert (env.id, env.source, env.type, env.user_id) == (
        "ce-1",
        "/billing",
        "com.acme.invoice.failed",
        "u-9",
    )
    assert env.occurred_at is not None and env.occurred_at.isoformat() == "2030-01-02T03:04:05+00:00"


def test_binary_cloudevent_reads_ce_headers_and_data_wins_over_subject() -> None:
    data = {"title": "Failed", "severity": "critical", "recipients": ["a", "b"]}
    out = Decoder(max_bytes=10_000)(js(data), binary_headers(subject="u-9"), TOPIC)
    env = out.envelopes[0]
    assert env.recipients == ["a", "b"] and env.user_id is None and env.severity == "critical"
    out2 = Decoder(max_bytes=10_000)(
        js({"title": "x", "user_id": "owner"}), binary_headers(subject="s"), TOPIC
    )
    assert out2.envelopes[0].user_id == "owner"


def test_attribute_wins_over_data_for_identity() -> None:
    data = {"title": "t", "id": "data-id", "type": "data.type"}
    env = Decoder(max_bytes=10_000)(js(data), binary_headers(subject="u"), TOPIC).envelopes[0]
    assert (env.id, env.type) == ("ce-1", "com.acme.invoice.failed")


@pytest.mark.parametrize(
    ("value", "headers", "word"),
    [
        (js({**CE, "specversion": "0.3", "data": {"title": "t"}}), STRUCTURED, "specversion"),
        (js({**CE, "id": "", "data": {"title": "t"}}), STRUCTURED, "id"),
        (js({**CE, "data_base64": "AAA="}), STRUCTURED, "data_base64"),
        (js({**CE, "subject": "u"}), STRUCTURED, "title"),  # no data, so no title
        (js([1, 2]), binary_headers(subject="u"), "data"),
        (b"<xml/>", [*binary_headers(subject="u")[:-1], ("content-type", b"application/xml")], "JSON"),
        (js({"title": "t"}), binary_headers(), "user_id"),  # no subject, no recipient in data
    ],
)
def test_malformed_cloudevents_are_schema_violations(value: bytes, headers: Any, word: str) -> None:
    err = rejected(Decoder(max_bytes=10_000), value, headers)
    assert err.reason == "schema", err
    assert word in err.message


def test_structured_cloudevent_not_an_object_is_not_object() -> None:
    assert isinstance(rejected(Decoder(max_bytes=10_000), b"[1]", STRUCTURED), NotAnObject)


def test_a_rule_can_match_a_cloudevent_by_type_and_maps_its_data() -> None:
    rs = rules(
        """
        [[rule]]
        name = "ce-invoice"
        match = { type = "com.acme.invoice.*", source = "/billing" }
        fields = { number = "invoice.number" }
        [[rule.emit]]
        title = "Invoice ${number} failed"
        severity = "critical"
        """
    )
    value = js({**CE, "subject": "u-7", "time": "2030-01-01T00:00:00Z", "data": {"invoice": {"number": 42}}})
    out = Decoder(max_bytes=10_000, rules=rs)(value, STRUCTURED, TOPIC)
    env = out.envelopes[0]
    assert out.via == "rule:ce-invoice"
    assert (env.title, env.user_id, env.id, env.source, env.type) == (
        "Invoice 42 failed",
        "u-7",
        "ce-1",
        "/billing",
        "com.acme.invoice.failed",
    )
    assert env.occurred_at is not None and env.occurred_at.year == 2030


# --- shipped rules on real-shaped samples ---------------------------------------------------------


def shipped() -> Decoder:
    return Decoder(max_bytes=256 * 1024, rules=RuleSet.load(SHIPPED))


def github_headers() -> list[tuple[str, bytes]]:
    lines = (SAMPLES / "github_issue_comment.headers").read_text().splitlines()
    return [(k, v.encode()) for k, _, v in (line.partition("=") for line in lines if line)]


def test_stripe_invoice_payment_failed() -> None:
    value = (SAMPLES / "stripe_invoice_payment_failed.json").read_bytes()
    out = shipped()(value, None, TOPIC)
    (env,) = out.envelopes
    assert out.via == "rule:stripe-invoice-payment-failed"
    assert env.user_id == "cus_PpQ8nAz1LmR2sT" and env.severity == "critical"
    assert env.resource_id == "in_1OzQ3s2eZvKYlo2Cq7x1bq9N" and env.id == "evt_1OzQ4u2eZvKYlo2CsWq1Rk3b"
    assert env.target_url is not None and env.target_url.startswith("https://invoice.stripe.com/i/")
    assert env.title == "Payment failed for invoice A1B2C3D4-0007" and env.source == "stripe"
    assert env.occurred_at is not None and int(env.occurred_at.timestamp()) == 1711962061
    (n,) = expand(env, default_source=TOPIC, record_time=None)
    assert n.idempotency_key == "r:22:invoice.payment_failed:in_1OzQ3s2eZvKYlo2Cq7x1bq9N"


def test_stripe_recipient_path_is_configurable() -> None:
    text = (SHIPPED / "stripe.toml").read_text()
    text = text.replace('"data.object.customer"', '"data.object.metadata.user_id"')
    value = (SAMPLES / "stripe_invoice_payment_failed.json").read_bytes()
    env = Decoder(max_bytes=256 * 1024, rules=rules(text))(value, None, TOPIC).envelopes[0]
    assert env.user_id == "user-8841"


def test_stripe_other_event_types_are_not_matched() -> None:
    value = json.loads((SAMPLES / "stripe_invoice_payment_failed.json").read_bytes())
    value["type"] = "invoice.paid"
    assert rejected(shipped(), js(value)).reason == "unmapped"


def test_github_issue_comment_tells_the_author_and_each_mention() -> None:
    value = (SAMPLES / "github_issue_comment.json").read_bytes()
    out = shipped()(value, github_headers(), TOPIC)
    author, mentions = out.envelopes
    assert (author.user_id, author.severity, author.batch_key) == ("octocat", "info", None)
    assert author.title == "hubot commented on acme/widgets#1347"
    assert author.id == "72d3162e-cc78-11e3-81ab-4c9367dc0958:author"
    assert mentions.recipients == ["mona-lisa", "defunkt"]  # once each; not the email, not `code`
    assert (mentions.severity, mentions.batch_key, mentions.type) == (
        "warning",
        "github:acme/widgets",
        "github.mention",
    )
    assert mentions.target_url == "https://github.com/acme/widgets/issues/1347#issuecomment-2031877123"


def test_github_without_the_event_header_is_not_matched() -> None:
    value = (SAMPLES / "github_issue_comment.json").read_bytes()
    headers = [(k, v) for k, v in github_headers() if k != "X-GitHub-Event"]
    assert rejected(shipped(), value, headers).reason == "unmapped"
    lower = [(k.lower(), v) for k, v in github_headers()]  # an HTTP bridge lower-cased the names
    assert shipped()(value, lower, TOPIC).via == "rule:github-issue-comment"


def test_github_comment_without_mentions_makes_one_notification() -> None:
    value = json.loads((SAMPLES / "github_issue_comment.json").read_bytes())
    value["comment"]["body"] = "Thanks, fixed in #1350."
    out = shipped()(js(value), github_headers(), TOPIC)
    assert [e.user_id for e in out.envelopes] == ["octocat"]


def test_github_never_tells_the_commenter_about_their_own_comment() -> None:
    value = json.loads((SAMPLES / "github_issue_comment.json").read_bytes())
    value["comment"]["user"]["login"] = "octocat"  # the issue's author comments
    value["comment"]["body"] = "Me again, @octocat here. @defunkt?"
    out = shipped()(js(value), github_headers(), TOPIC)
    assert [(e.type, e.user_id, e.recipients) for e in out.envelopes] == [
        ("github.mention", None, ["defunkt"])
    ]
    value["comment"]["body"] = "Only me, @octocat."
    with pytest.raises(NoRecipients):
        shipped()(js(value), github_headers(), TOPIC)


def test_job_failed_has_no_id_so_the_value_hash_is_the_key() -> None:
    value = (SAMPLES / "job_failed.json").read_bytes()
    out = shipped()(value, None, TOPIC)
    (env,) = out.envelopes
    assert out.content_keyed
    assert env.idempotency_key == content_key(value)
    assert (env.severity, env.batch_key, env.user_id) == ("warning", "job:nightly-export", "user-42")
    high = json.loads(value)
    high["priority"] = "high"
    assert shipped()(js(high), None, TOPIC).envelopes[0].severity == "critical"


# --- rule errors at run time -----------------------------------------------------------------------


def test_a_template_naming_a_missing_field_is_a_mapping_error() -> None:
    value = json.loads((SAMPLES / "stripe_invoice_payment_failed.json").read_bytes())
    del value["data"]["object"]["hosted_invoice_url"]
    err = rejected(shipped(), js(value))
    assert isinstance(err, MappingFailed) and err.reason == "mapping"
    assert "'url'" in err.message and "data.object.hosted_invoice_url" in err.message


def test_a_rule_output_that_breaks_the_envelope_is_a_schema_violation() -> None:
    value = json.loads((SAMPLES / "stripe_invoice_payment_failed.json").read_bytes())
    value["data"]["object"]["hosted_invoice_url"] = "http://insecure.example.com/i/1"
    err = rejected(shipped(), js(value))
    assert isinstance(err, SchemaViolation) and "stripe-invoice-payment-failed" in err.message
    assert "target_url" in err.message


def test_every_recipient_list_empty_is_no_recipients() -> None:
    rs = rules(
        """
        [[rule]]
        name = "fanout"
        match = { type = "x" }
        fields = { who = "who" }
        [[rule.emit]]
        to = "who"
        title = "t"
        """
    )
    assert isinstance(rejected(Decoder(max_bytes=1000, rules=rs), js({"type": "x", "who": []})), NoRecipients)


def test_lookup_without_default_and_an_unknown_value_is_a_mapping_error() -> None:
    rs = rules(
        """
        [[rule]]
        name = "lk"
        match = { type = "x" }
        fields = { who = "who", level = "level" }
        [[rule.emit]]
        to = "who"
        title = "t $$5"
        severity = { field = "level", map = { red = "critical" } }
        """
    )
    d = Decoder(max_bytes=1000, rules=rs)
    assert d(js({"type": "x", "who": "u", "level": "red"}), None, TOPIC).envelopes[0].title == "t $5"
    err = rejected(d, js({"type": "x", "who": "u", "level": "blue"}))
    assert err.reason == "mapping" and "'blue'" in err.message


def test_templates_never_evaluate_what_they_insert() -> None:
    rs = rules(
        """
        [[rule]]
        name = "safe"
        match = { topic = "raw" }
        id = "id"
        fields = { id = "id", who = "who", text = "text" }
        [[rule.emit]]
        to = "who"
        type = "raw.text"
        title = "${text}"
        """
    )
    evil = "${who} {0.__class__} %(x)s $$"
    env = Decoder(max_bytes=1000, rules=rs)(js({"id": "1", "who": "u", "text": evil}), None, "raw").envelopes[
        0
    ]
    assert env.title == evil


@pytest.mark.parametrize("with_rules", [False, True])
def test_json_nested_past_the_stack_is_not_json_not_a_crash(with_rules: bool) -> None:
    # 100,000 open brackets are 100 KB, under the size limit: a poison record the chaos run
    # sends. Python's json raised RecursionError (a RuntimeError) through the decoder.
    decoder = Decoder(max_bytes=262_144, rules=RuleSet.load(SHIPPED) if with_rules else None)
    assert rejected(decoder, b"[" * 100_000).reason == "not_json"
    assert rejected(decoder, b'{"a":' * 40_000).reason == "not_json"
