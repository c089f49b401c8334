"""Pure pieces of the email and push channels: rendering, templates, answers, settings."""

from __future__ import annotations

import email
import email.policy
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import http_ece
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from channels.base import Endpoint
from channels.email import EmailProvider, _reply
from channels.push import (
    PushProvider,
    Subscription,
    b64url,
    classify_push,
    encrypt,
    generate_keys,
    load_vapid,
)
from config.settings import PolicySettings, Settings
from core.digest import DigestItem, digest_record
from core.errors import ConfigError
from herald.cli import main

SMTP = {"host": "relay.example.com", "tls": "none", "from": "Herald Ops <ops@example.com>"}


def provider(**overrides: Any) -> EmailProvider:
    values: dict[str, Any] = {"smtp": SMTP, "app_url": "https://app.example.com"}
    values.update(overrides)
    return EmailProvider(Settings(**values))


def delivery(**fields: Any) -> dict[str, Any]:
    base = {
        "delivery_id": str(uuid.uuid4()),
        "notification_id": str(uuid.uuid4()),
        "user_id": "u1",
        "title": "Build failed",
        "summary": "main is red",
        "target_url": "/builds/7",
        "severity": "critical",
        "occurred_at": "2026-11-25T10:00:00+00:00",
    }
    return base | fields


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage) and not msg.defects
    return msg


def parts(raw: bytes) -> tuple[str, str]:
    msg = parse(raw)
    text, markup = msg.get_body(("plain",)), msg.get_body(("html",))
    assert text is not None and markup is not None
    return text.get_content(), markup.get_content()  # type: ignore[attr-defined]


def test_a_digest_lists_its_items_in_both_parts_escaped_in_html() -> None:
    start = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    first = [
        DigestItem(uuid.uuid4(), "Job <b>export</b> failed", "/jobs/1"),
        DigestItem(uuid.uuid4(), "Job import failed", "https://ci.example.com/jobs/2"),
    ]
    record = digest_record(
        delivery_id=uuid.uuid4(),
        user_id="u1",
        channel="email",
        batch_key="jobs",
        window_start=start,
        window_seconds=300,
        sequence=0,
        count=5,
        first=first,
        critical=False,
        inbox_path="/notifications",
        policy=PolicySettings(),
    )
    raw = provider().message(Endpoint(1, "u1", "a@example.org"), record)
    msg = parse(raw)
    assert msg["Subject"] == "5 new notifications: jobs"
    text, markup = parts(raw)
    assert "- Job <b>export</b> failed: https://app.example.com/jobs/1" in text
    assert "- Job import failed: https://ci.example.com/jobs/2" in text and "and 3 more" in text
    assert '<a href="https://app.example.com/jobs/1">Job &lt;b&gt;export&lt;/b&gt; failed</a>' in markup
    assert "<li>and 3 more</li>" in markup and "<b>export" not in markup
    assert "https://app.example.com/notifications" in text, "the digest's link is the inbox"


def test_headers_non_ascii_and_no_unsubscribe_without_a_secret() -> None:
    d = delivery(title="Zahlung fehlgeschlagen – Überweisung\r\nBcc: evil@example.com")
    raw = provider().message(Endpoint(1, "u1", "a@example.org"), d)
    msg = parse(raw)
    assert msg["Subject"] == "Zahlung fehlgeschlagen – Überweisung Bcc: evil@example.com"
    assert msg["Bcc"] is None, "a line break in a title never makes a header"
    assert msg["From"] == "Herald Ops <ops@example.com>"
    assert msg["Message-ID"] == f"<{d['delivery_id']}@example.com>"
    assert msg["List-Unsubscribe"] is None
    assert all(len(line) <= 998 for line in raw.split(b"\n"))
    with pytest.raises(ValueError):
        provider().message(Endpoint(1, "u1", "a@example.org\r\nBcc: x@example.com"), d)


def test_templates_from_settings_replace_the_built_in_ones(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("T: $title -> $url\n")
    (tmp_path / "t.html").write_text("<p>$title</p><a href='$unsubscribe_url'>x</a>\n")
    p = provider(
        smtp=SMTP | {"text_template": tmp_path / "t.txt", "html_template": tmp_path / "t.html"},
        unsubscribe_secret="s" * 32,
        public_url="https://h.example.com",
    )
    text, markup = parts(p.message(Endpoint(1, "u1", "a@example.org"), delivery(title="a & <b>")))
    assert text == "T: a & <b> -> https://app.example.com/builds/7\n"
    assert markup.startswith(
        "<p>a &amp; &lt;b&gt;</p><a href='https://h.example.com/v1/unsubscribe?token=v1."
    )
    (tmp_path / "bad.txt").write_text("$titel\n")
    with pytest.raises(ConfigError, match="HERALD_SMTP__TEXT_TEMPLATE"):
        provider(smtp=SMTP | {"text_template": tmp_path / "bad.txt"})
    with pytest.raises(ConfigError, match="cannot read email template"):
        provider(smtp=SMTP | {"html_template": tmp_path / "missing.html"})


def test_smtp_replies_classify() -> None:
    assert _reply(421, "x").outcome == "transient"
    assert _reply(451, "x").outcome == "transient"
    assert _reply(550, "x").outcome == "permanent"
    assert _reply(554, "x").outcome == "permanent"
    assert _reply(-1, "x").outcome == "transient"


def test_push_answers_classify() -> None:
    assert classify_push(201, {}).outcome == "ok"
    assert classify_push(404, {}).outcome == "gone"
    assert classify_push(410, {}).outcome == "gone"
    busy = classify_push(429, {"retry-after": "7"})
    assert (busy.outcome, busy.retry_after_s) == ("transient", 7.0)
    assert classify_push(503, {}).outcome == "transient"
    assert classify_push(413, {}).outcome == "permanent"
    assert classify_push(403, {}).outcome == "permanent", "a VAPID key the subscription was not made with"


def test_push_encryption_round_trips_and_vapid_keys_load() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    auth = b"0123456789abcdef"
    sub = Subscription(
        f'{{"endpoint":"https://push.example/x","keys":{{"p256dh":"{b64url(point)}","auth":"{b64url(auth)}"}}}}'
    )
    body = encrypt(b'{"title":"hi"}', sub)
    assert http_ece.decrypt(body, private_key=key, auth_secret=auth, version="aes128gcm") == b'{"title":"hi"}'
    private, public = generate_keys()
    assert load_vapid(private).public_key is not None and len(public) == 87
    with pytest.raises(ConfigError, match="HERALD_PUSH__VAPID_PRIVATE_KEY"):
        load_vapid("not-a-key")
    p = PushProvider(Settings(push={"vapid_private_key": private, "vapid_subject": "mailto:a@example.com"}))
    first = p.authorization("https://push.example")
    assert first == p.authorization("https://push.example"), "one token per origin, reused"
    assert first.startswith("vapid t=") and f"k={public}" in first


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"HERALD_SMTP__TLS": "ssl"}, "smtp.tls: unknown tls 'ssl'"),
        ({"HERALD_SMTP__USERNAME": "u"}, "set both username and password"),
        ({"HERALD_SMTP__FROM": "nobody"}, "is not an email address"),
        ({"HERALD_PUSH__VAPID_SUBJECT": "ops@example.com"}, "mailto:"),
    ],
)
def test_wrong_settings_are_one_line(
    env: dict[str, str], needle: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError):
        Settings()
    assert main(["deliver", "--channel", "email"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("channel", "env", "needle"),
    [
        ("email", {}, "set HERALD_SMTP__HOST"),
        ("email", {"HERALD_SMTP__HOST": "relay"}, "set HERALD_SMTP__FROM"),
        ("push", {}, "HERALD_PUSH__VAPID_PRIVATE_KEY and HERALD_PUSH__VAPID_SUBJECT"),
        (
            "push",
            {"HERALD_PUSH__VAPID_PRIVATE_KEY": "abc", "HERALD_PUSH__VAPID_SUBJECT": "mailto:a@example.com"},
            "is not a P-256 private key",
        ),
    ],
)
def test_a_channel_without_its_settings_refuses_to_start_in_one_line(
    channel: str,
    env: dict[str, str],
    needle: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for k in ("HERALD_SMTP__HOST", "HERALD_SMTP__FROM", "HERALD_PUSH__VAPID_PRIVATE_KEY"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["deliver", "--channel", channel]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_vapid_generate_prints_a_usable_pair(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vapid", "generate"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("HERALD_PUSH__VAPID_PRIVATE_KEY=")
    load_vapid(out[0].split("=", 1)[1])
    assert "applicationServerKey" in out[1]
