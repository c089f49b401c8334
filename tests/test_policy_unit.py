"""Pure policy: channel planning, rate limits and redaction (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from config.settings import CHANNELS, DEFAULT_REDACTIONS, PolicySettings
from core import policy
from core.envelope import Envelope, Notification, expand
from core.policy import (
    DIGEST,
    IMMEDIATE,
    REASON_RATE_LIMITED,
    REASON_WARNING,
    Decision,
    Preferences,
    apply_rate_limits,
    plan,
    rate_key,
    requested,
)
from core.redaction import redact

T0 = datetime(2030, 1, 1, 10, 0, 0, tzinfo=UTC)
POLICY = PolicySettings()
ALL_ON = Preferences(in_app=True, email=True, push=True, webhook=True, digest_minutes=5)


def note(
    severity: str = "critical", user: str = "u1", n: int = 0, at: datetime = T0, **fields: Any
) -> Notification:
    values: dict[str, Any] = {
        "id": f"e{n}-{user}-{at.isoformat()}",
        "type": "job.failed",
        "title": "Job failed",
        "user_id": user,
        "severity": severity,
        "occurred_at": at,
    }
    env = Envelope(**{**values, **fields})
    [out] = expand(env, default_source="src", record_time=None)
    return out


def prefs(**changes: Any) -> Preferences:
    return Preferences.defaults(POLICY).merged(changes)


# --- plan ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("severity", ["info", "success"])
def test_info_and_success_never_go_out(severity: str) -> None:
    assert plan(note(severity), ALL_ON) == []


def test_warning_goes_to_the_digest_with_reason_warning() -> None:
    decisions = plan(note("warning"), ALL_ON)
    assert [(d.channel, d.route, d.reason) for d in decisions] == [
        (c, DIGEST, REASON_WARNING) for c in CHANNELS
    ]


def test_critical_goes_out_immediately_on_every_enabled_channel() -> None:
    decisions = plan(note("critical"), ALL_ON)
    assert [(d.channel, d.route, d.reason) for d in decisions] == [(c, IMMEDIATE, None) for c in CHANNELS]


def test_channel_off_gives_no_decision() -> None:
    decisions = plan(note("critical"), prefs(email=True, push=False, webhook=False))
    assert [d.channel for d in decisions] == ["email"]
    assert plan(note("critical"), prefs(email=False, push=False, webhook=False)) == []


def test_defaults_send_nothing_external() -> None:
    """Preference defaults: in-app on, email/push/webhook off, digest 5 minutes."""
    d = Preferences.defaults(POLICY)
    assert (d.in_app, d.email, d.push, d.webhook, d.digest_minutes) == (True, False, False, False, 5)
    assert plan(note("critical"), d) == []


def test_digest_minutes_zero_sends_warnings_at_once() -> None:
    decisions = plan(note("warning"), prefs(email=True, digest_minutes=0))
    assert [(d.channel, d.route, d.reason) for d in decisions] == [("email", IMMEDIATE, None)]


def test_in_app_off_does_not_silence_external_channels() -> None:
    decisions = plan(note("critical"), prefs(in_app=False, email=True))
    assert [(d.channel, d.route) for d in decisions] == [("email", IMMEDIATE)]


def test_stored_none_means_default() -> None:
    p = prefs(email=None, push=True, digest_minutes=None)
    assert (p.email, p.push, p.digest_minutes) == (False, True, 5)


def test_delivery_id_is_deterministic_per_notification_and_channel() -> None:
    n = note("critical")
    a = plan(n, ALL_ON)
    b = plan(n, ALL_ON)
    assert [d.delivery_id for d in a] == [d.delivery_id for d in b]
    assert len({d.delivery_id for d in a}) == len(CHANNELS)


# --- rate limits -----------------------------------------------------------------------------------


def critical_emails(count: int, user: str = "u1", at: datetime = T0) -> list[Decision]:
    p = prefs(email=True)
    return [d for i in range(count) for d in plan(note("critical", user, i, at + timedelta(seconds=i)), p)]


def counts_after(decisions: list[Decision], before: int = 0) -> dict[policy.RateKey, int]:
    return {k: before + n for k, n in requested(decisions).items()}


def test_rate_window_is_the_event_time_minute() -> None:
    [a] = critical_emails(1, at=T0 + timedelta(seconds=59))
    assert rate_key(a) == ("u1", "email", T0)


def test_sixth_within_a_minute_goes_to_the_digest_as_rate_limited() -> None:
    decisions = critical_emails(6)
    out = apply_rate_limits(decisions, counts_after(decisions), POLICY)
    assert [(d.route, d.reason) for d in out] == [(IMMEDIATE, None)] * 5 + [(DIGEST, REASON_RATE_LIMITED)]
    assert [d.delivery_id for d in out] == [d.delivery_id for d in decisions]  # same ids, other route


def test_counts_from_earlier_batches_are_respected() -> None:
    decisions = critical_emails(3)
    out = apply_rate_limits(decisions, counts_after(decisions, before=4), POLICY)
    assert [d.route for d in out] == [IMMEDIATE, DIGEST, DIGEST]
    out = apply_rate_limits(decisions, counts_after(decisions, before=5), POLICY)
    assert [d.reason for d in out] == [REASON_RATE_LIMITED] * 3


def test_rate_limits_are_per_user_per_channel_per_minute() -> None:
    p = prefs(email=True, push=True)
    decisions = [d for i in range(6) for d in plan(note("critical", "u1", i), p)]
    decisions += critical_emails(6, user="u2")
    decisions += critical_emails(6, user="u1", at=T0 + timedelta(minutes=1))
    out = apply_rate_limits(decisions, counts_after(decisions), POLICY)
    limited = [(d.notification.user_id, d.channel, rate_key(d)[2]) for d in out if d.route == DIGEST]
    # u1/email in minute 0 and 1, u2/email in minute 0: one each; push (limit 20) none.
    assert sorted(limited) == [
        ("u1", "email", T0),
        ("u1", "email", T0 + timedelta(minutes=1)),
        ("u2", "email", T0),
    ]


def test_digest_decisions_do_not_use_the_rate_limit() -> None:
    p = prefs(email=True)
    warnings = [d for i in range(10) for d in plan(note("warning", n=i), p)]
    out = apply_rate_limits(warnings, counts_after(warnings), POLICY)
    assert {d.reason for d in out} == {REASON_WARNING}
    assert requested(warnings) == {}


def test_limit_comes_from_the_policy() -> None:
    decisions = critical_emails(3)
    strict = PolicySettings(rate_limits={"email": 1})
    out = apply_rate_limits(decisions, counts_after(decisions), strict)
    assert [d.route for d in out] == [IMMEDIATE, DIGEST, DIGEST]


# --- redaction -------------------------------------------------------------------------------------


def r(text: str) -> str | None:
    return redact(text, DEFAULT_REDACTIONS)


@pytest.mark.parametrize(
    "secret",
    ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "378282246310005"],
)
def test_redact_masks_card_numbers(secret: str) -> None:
    out = r(f"card {secret} was declined")
    assert out is not None
    assert secret not in out
    assert "[redacted]" in out
    assert "1111" not in out and "0005" not in out


def test_redact_keeps_the_words_around_a_card_number() -> None:
    """BUG (config/settings.py, DEFAULT_REDACTIONS[0]): ``\\b(?:\\d[ -]?){13,19}\\b`` also eats the
    separator after the last digit, so "card 4111 1111 1111 1111 was" becomes "card [redacted]was"."""
    out = r("card 4111 1111 1111 1111 was declined")
    assert out == "card [redacted] was declined", f"BUG: redaction ate the separator: {out!r}"


@pytest.mark.parametrize(
    "secret",
    [
        "sk_live_abcdefgh12345678",
        "pk_test_ABCDEFGH12345678",
        "ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
        "bearer abcdefgh12345678",
    ],
)
def test_redact_masks_tokens(secret: str) -> None:
    out = r(f"use {secret} now")
    assert out is not None
    assert secret not in out
    assert "[redacted]" in out
    assert out.startswith("use ") and out.endswith(" now")


def test_redact_masks_slack_tokens() -> None:
    """BUG (config/settings.py, DEFAULT_REDACTIONS[1]): the pattern lists ``xox[abp]`` but requires an
    underscore after the prefix; real Slack tokens use a hyphen (``xoxb-…``), so none is ever masked."""
    secret = "AbCdEfGhIjKlMnOpQrStUvWx"
    out = r(f"token xoxb-123456789012-1234567890123-{secret} leaked")
    assert out is not None
    assert secret not in out, f"Slack token left in external text: {out!r}"


@pytest.mark.parametrize("email", ["bob@example.com", "first.last+tag@mail.example.co.uk"])
def test_redact_masks_email_addresses(email: str) -> None:
    assert r(f"sent to {email}, thanks") == "sent to [redacted], thanks"


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "Invoice 12345 for $99.50 failed at 10:30 on 2030-01-01"
    assert r(text) == text


def test_redact_none_and_empty_list() -> None:
    assert redact(None, DEFAULT_REDACTIONS) is None
    assert redact("bob@example.com", ()) == "bob@example.com"


def test_external_record_is_redacted_and_carries_no_body_or_data() -> None:
    n = note(
        "critical",
        body="Charge to bob@example.com failed, secret body",
        data={"card": "4111"},
        summary="Mail bob@example.com about 4111 1111 1111 1111",
        title="Refund for bob@example.com",
        target_url="/invoices/1",
    )
    [d] = plan(n, prefs(email=True))
    rec = policy.decision_record(d, POLICY)
    assert "body" not in rec and "data" not in rec
    assert "bob@example.com" not in str(rec)
    assert "secret body" not in str(rec)
    assert rec["title"] == "Refund for [redacted]"
    assert rec["delivery_id"] == str(d.delivery_id)
    assert rec["notification_id"] == str(n.id)
    assert (rec["channel"], rec["route"], rec["reason"], rec["target_url"]) == (
        "email",
        IMMEDIATE,
        None,
        "/invoices/1",
    )


def test_long_texts_are_redacted_too_without_filling_the_cache() -> None:
    from core.redaction import CACHED_CHARS, _redacted

    text = "x " * CACHED_CHARS + "mail bob@example.com"
    before = _redacted.cache_info().currsize
    assert redact(text, DEFAULT_REDACTIONS) == "x " * CACHED_CHARS + "mail [redacted]"
    assert _redacted.cache_info().currsize == before
