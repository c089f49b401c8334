"""Rules files are validated at load time; errors name the rule and the field (pure)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from consumers.rules import RuleSet
from core.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "rules"

GOOD = """
[[rule]]
name = "ok"
match = { type = "x" }
fields = { who = "who" }
[[rule.emit]]
to = "who"
title = "t"
"""


def load_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        RuleSet.from_data(tomllib.loads(text), "r.toml")
    return str(info.value)


def test_the_shipped_rules_load() -> None:
    rs = RuleSet.load(SHIPPED)
    assert {r.name for r in rs.rules} == {
        "stripe-invoice-payment-failed",
        "github-issue-comment",
        "job-failed",
    }
    for f in SHIPPED.glob("*.toml"):
        assert len(RuleSet.load(f)) == 1


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (GOOD.replace('title = "t"', 'title = "Hi ${nobody}"'), ["rule 'ok'", "title", "${nobody}"]),
        (GOOD.replace('to = "who"', 'to = "whom"'), ["rule 'ok'", "emit 'default': to", "'whom'"]),
        (GOOD.replace('title = "t"', 'title = "t"\nseverity = "fatal"'), ["rule 'ok'", "emit.0.severity"]),
        (GOOD.replace('title = "t"', 'title = "t"\ncolour = "red"'), ["rule 'ok'", "emit.0.colour"]),
        (GOOD.replace('title = "t"\n', ""), ["rule 'ok'", "emit.0.title", "required"]),
        (GOOD.replace('match = { type = "x" }', "match = {}"), ["rule 'ok'", "match", "at least one"]),
        (GOOD.replace('"who" }', '"a..b" }'), ["rule 'ok'", "fields.who.path", "bad path"]),
        (GOOD.replace('"who" }', '{ path = "w", findall = "(" } }'), ["rule 'ok'", "findall"]),
        (GOOD.replace('title = "t"', 'title = "t $"'), ["rule 'ok'", "invalid template"]),
        (
            GOOD.replace('title = "t"', 'title = "t"\nseverity = { field = "who", map = { a = "loud" } }'),
            ["rule 'ok'", "severity", "lookup values"],
        ),
        (GOOD.replace('name = "ok"', 'name = ""'), ["rule #1", "name"]),
        (GOOD + GOOD, ["repeated: ok"]),
        ("", ["rule", "required"]),
    ],
)
def test_invalid_rules_name_the_rule_and_the_field(text: str, words: list[str]) -> None:
    message = load_error(text)
    assert message.startswith("rules file r.toml: ")
    for w in words:
        assert w in message, message


def test_second_emit_needs_its_own_name() -> None:
    text = GOOD + '[[rule.emit]]\nto = "who"\ntitle = "again"\n'
    assert "names must be unique" in load_error(text)


def test_unreadable_and_not_toml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        RuleSet.load(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RuleSet.load(bad)
    with pytest.raises(ConfigError, match="no \\*.toml"):
        RuleSet.load(tmp_path / "empty") if (tmp_path / "empty").mkdir() is None else None


def test_a_folder_refuses_the_same_rule_name_twice(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(GOOD)
    (tmp_path / "b.toml").write_text(GOOD)
    with pytest.raises(ConfigError, match="repeated: ok"):
        RuleSet.load(tmp_path)


STRIPE_YAML = """
rule:
  - name: stripe-invoice-payment-failed
    match: {type: invoice.payment_failed, fields: {object: event}}
    id: event_id
    occurred_at: created
    source: stripe
    fields:
      event_id: id
      created: created
      recipient: data.object.customer
      invoice: data.object.id
      number: {path: data.object.number, default: "(draft)"}
      url: data.object.hosted_invoice_url
    emit:
      - to: recipient
        severity: critical
        category: billing
        title: "Payment failed for invoice ${number}"
        summary: >-
          We could not collect the payment for invoice ${number}.
          Update your payment method to keep your plan.
        resource_id: "${invoice}"
        target_url: "${url}"
"""


def test_yaml_rules_map_exactly_like_their_toml_twin(tmp_path: Path) -> None:
    from consumers.decode import Decoder

    (tmp_path / "stripe.yaml").write_text(STRIPE_YAML)
    sample = (SHIPPED.parent.parent / "tests" / "samples" / "stripe_invoice_payment_failed.json").read_bytes()
    from_yaml = Decoder(max_bytes=1 << 20, rules=RuleSet.load(tmp_path / "stripe.yaml"))
    from_toml = Decoder(max_bytes=1 << 20, rules=RuleSet.load(SHIPPED / "stripe.toml"))
    got = from_yaml(sample, None, "herald.events").envelopes
    assert got and got == from_toml(sample, None, "herald.events").envelopes
    assert RuleSet.load(tmp_path).rules[0].name == "stripe-invoice-payment-failed"  # a folder of YAML


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("rule:\n  - name: x\n    match: {type: [unclosed\n")
    with pytest.raises(ConfigError, match=r"rules file .*bad.yml: not valid YAML"):
        RuleSet.load(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        RuleSet.load(scalar)
