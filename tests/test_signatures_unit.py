"""Signature schemes over raw bytes: reference vectors, each scheme's failures, key rotation (pure).

Expected signatures are computed here with hmac/hashlib straight from each sender's
documentation (or taken from the specification's published vectors), never with the
code under test's ``sign``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import standardwebhooks.webhooks as swlib

from config.settings import SourceSettings
from producers.signatures import Scheme, SignatureError, scheme_for

# Standard Webhooks' published vector (the specification's library tests).
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_TS = 1614265330
SW_BODY = b'{"test": 2432232314}'
SW_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
SW_BAD_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="

# GitHub's documented example ("Validating webhook deliveries").
GH_SECRET = "It's a Secret to Everybody"
GH_BODY = b"Hello, World!"
GH_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

BODY = b'{"id": "evt_1", "type": "invoice.payment_failed", "object": "event"}'


def source(**fields: Any) -> SourceSettings:
    return SourceSettings(**fields)


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


@pytest.fixture
def frozen_sw_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library reads its own clock: pin it to the vector's time (pure unit test)."""

    class At(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.fromtimestamp(SW_TS + 10, UTC)

    monkeypatch.setattr(swlib, "datetime", At)


def sw_headers(signature: str = SW_SIGNATURE, msg_id: str = SW_ID, ts: int = SW_TS) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def sw_sign(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def stripe_header(secret: str, body: bytes, ts: int) -> str:
    digest = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


# --- Standard Webhooks ---------------------------------------------------------------------------


def test_standard_webhooks_reference_vector_passes(frozen_sw_clock: None) -> None:
    scheme = scheme_for(source(scheme="standard-webhooks", secrets=[SW_SECRET]))
    scheme.verify(SW_BODY, sw_headers())
    # Also without the whsec_ prefix, and signing gives the published signature.
    bare = scheme_for(source(scheme="standard-webhooks", secrets=[SW_SECRET.removeprefix("whsec_")]))
    bare.verify(SW_BODY, sw_headers())
    assert scheme.sign(SW_BODY, event_id=SW_ID, now=SW_TS)["webhook-signature"] == SW_SIGNATURE


def test_standard_webhooks_reference_vector_fails(frozen_sw_clock: None) -> None:
    scheme = scheme_for(source(scheme="standard-webhooks", secrets=[SW_SECRET]))
    with pytest.raises(SignatureError, match="no matching signature"):
        scheme.verify(SW_BODY, sw_headers(SW_BAD_SIGNATURE))
    # The published vector's signature does not fit another id, time or body.
    for headers, body in (
        (sw_headers(msg_id="msg_other"), SW_BODY),
        (sw_headers(ts=SW_TS + 1), SW_BODY),
        (sw_headers(), SW_BODY + b" "),
    ):
        with pytest.raises(SignatureError):
            scheme.verify(body, headers)


def test_standard_webhooks_several_signatures_in_one_header(frozen_sw_clock: None) -> None:
    """Senders rotating their own key send several, space-separated; any v1 match passes."""
    scheme = scheme_for(source(scheme="standard-webhooks", secrets=[SW_SECRET]))
    several = " ".join(["v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=", "v2,abc=", SW_SIGNATURE])
    scheme.verify(SW_BODY, sw_headers(several))


@pytest.mark.parametrize(
    "headers, reason",
    [
        ({"webhook-timestamp": str(SW_TS), "webhook-signature": SW_SIGNATURE}, "missing webhook-id"),
        ({"webhook-id": SW_ID, "webhook-signature": SW_SIGNATURE}, "missing webhook-timestamp"),
        ({"webhook-id": SW_ID, "webhook-timestamp": str(SW_TS)}, "missing webhook-signature"),
        (sw_headers("garbage"), "malformed"),
        (sw_headers("v1,not base64!"), "signature"),
        ({**sw_headers(), "webhook-timestamp": "soon"}, "invalid"),
    ],
)
def test_standard_webhooks_bad_headers_are_401_reasons_not_crashes(
    frozen_sw_clock: None, headers: dict[str, str], reason: str
) -> None:
    scheme = scheme_for(source(scheme="standard-webhooks", secrets=[SW_SECRET]))
    with pytest.raises(SignatureError, match=reason):
        scheme.verify(SW_BODY, headers)


def test_standard_webhooks_body_that_is_not_utf8_is_refused() -> None:
    scheme = scheme_for(source(scheme="standard-webhooks", secrets=[SW_SECRET]))
    now = int(time.time())
    with pytest.raises(SignatureError, match="UTF-8"):
        scheme.verify(b"\xff\xfe", sw_headers(sw_sign(SW_SECRET, SW_ID, now, b"x"), ts=now))


# --- every signed scheme: clock, tampering, wrong secret, rotation -----------------------------------

OLD, NEW = "whsec_b2xkIHNlY3JldCBvbmU=", "whsec_bmV3IHNlY3JldCB0d28="
OTHER = "whsec_c29tZWJvZHkgZWxzZQ=="


def signed(scheme_name: str, secret: str, body: bytes, ts: int) -> dict[str, str]:
    """A request as each sender builds it, from its documentation."""
    if scheme_name == "standard-webhooks":
        return sw_headers(sw_sign(secret, "msg_1", ts, body), msg_id="msg_1", ts=ts)
    if scheme_name == "stripe":
        return {"stripe-signature": stripe_header(secret, body, ts)}
    if scheme_name == "github":
        return {
            "x-hub-signature-256": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        }
    assert scheme_name == "hmac-header"
    digest = hmac.new(secret.encode(), body, hashlib.sha512).digest()
    return {"x-signature": "v=" + base64.b64encode(digest).decode()}


def configured(scheme_name: str, secrets: list[str]) -> Scheme:
    extra: dict[str, Any] = {}
    if scheme_name == "hmac-header":
        extra = {"header": "X-Signature", "algorithm": "sha512", "encoding": "base64", "prefix": "v="}
    return scheme_for(source(scheme=scheme_name, secrets=secrets, **extra))


SIGNED = ["standard-webhooks", "stripe", "github", "hmac-header"]


@pytest.mark.parametrize("name", SIGNED)
def test_a_fresh_signature_passes(name: str) -> None:
    now = int(time.time())
    configured(name, [NEW]).verify(BODY, signed(name, NEW, BODY, now))


@pytest.mark.parametrize("name", SIGNED)
def test_key_rotation_accepts_either_secret_and_nothing_else(name: str) -> None:
    now = int(time.time())
    scheme = configured(name, [OLD, NEW])
    scheme.verify(BODY, signed(name, OLD, BODY, now))
    scheme.verify(BODY, signed(name, NEW, BODY, now))
    with pytest.raises(SignatureError, match="no matching signature"):
        scheme.verify(BODY, signed(name, OTHER, BODY, now))


@pytest.mark.parametrize("name", SIGNED)
def test_a_tampered_body_fails(name: str) -> None:
    now = int(time.time())
    headers = signed(name, NEW, BODY, now)
    with pytest.raises(SignatureError, match="no matching signature"):
        configured(name, [NEW]).verify(BODY.replace(b"evt_1", b"evt_2"), headers)


@pytest.mark.parametrize("name", SIGNED)
def test_a_wrong_secret_fails(name: str) -> None:
    now = int(time.time())
    with pytest.raises(SignatureError, match="no matching signature"):
        configured(name, [NEW]).verify(BODY, signed(name, OTHER, BODY, now))


@pytest.mark.parametrize("name", ["standard-webhooks", "stripe"])
@pytest.mark.parametrize("offset, word", [(-301, "old"), (301, "new")])
def test_a_stale_or_future_timestamp_fails(name: str, offset: int, word: str) -> None:
    """Five minutes either way; a correct signature does not save a replayed or forged time."""
    at = int(time.time()) + offset
    with pytest.raises(SignatureError, match=f"too {word}"):
        configured(name, [NEW]).verify(BODY, signed(name, NEW, BODY, at))
    # Just inside the window passes.
    inside = int(time.time()) + (offset - 10 if offset > 0 else offset + 10)
    configured(name, [NEW]).verify(BODY, signed(name, NEW, BODY, inside))


@pytest.mark.parametrize("name", SIGNED)
def test_a_missing_signature_fails(name: str) -> None:
    with pytest.raises(SignatureError, match="missing"):
        configured(name, [NEW]).verify(BODY, {})


# --- Stripe and GitHub specifics -----------------------------------------------------------------


def test_stripe_tolerance_is_a_setting() -> None:
    at = int(time.time()) - 100
    strict = scheme_for(source(scheme="stripe", secrets=[NEW], tolerance_s=60))
    with pytest.raises(SignatureError, match="too old"):
        strict.verify(BODY, signed("stripe", NEW, BODY, at))


@pytest.mark.parametrize(
    "header", ["t=abc,v1=00", "v1=00", "t=1", "", "t=1,v1=zz", "t=1,v0=" + "00" * 32, "nonsense"]
)
def test_stripe_malformed_headers_fail_cleanly(header: str) -> None:
    with pytest.raises(SignatureError):
        scheme_for(source(scheme="stripe", secrets=[NEW])).verify(BODY, {"stripe-signature": header})


def test_stripe_event_id_comes_from_the_body() -> None:
    scheme = scheme_for(source(scheme="stripe", secrets=[NEW]))
    assert scheme.event_id(BODY, {}) == "evt_1"
    assert scheme.event_id(b"[1]", {}) is None
    assert scheme.event_id(b"not json", {}) is None


def test_github_documented_example() -> None:
    scheme = scheme_for(source(scheme="github", secrets=[GH_SECRET]))
    scheme.verify(GH_BODY, {"x-hub-signature-256": GH_SIGNATURE})
    with pytest.raises(SignatureError, match="does not start with"):
        scheme.verify(GH_BODY, {"x-hub-signature-256": GH_SIGNATURE.replace("sha256=", "sha1=")})
    with pytest.raises(SignatureError, match="not hex"):
        scheme.verify(GH_BODY, {"x-hub-signature-256": "sha256=xyz"})
    assert scheme.sign(GH_BODY, event_id="d-1")["X-Hub-Signature-256"] == GH_SIGNATURE
    assert scheme.event_id(GH_BODY, {"x-github-delivery": "d-1"}) == "d-1"
    assert "X-GitHub-Event" in scheme.forward and "X-GitHub-Delivery" in scheme.forward


def test_hmac_header_hex_sha1_and_an_id_header() -> None:
    scheme = scheme_for(
        source(scheme="hmac-header", secrets=["k"], header="X-Sig", algorithm="sha1", id_header="X-Event-Id")
    )
    good = hmac.new(b"k", BODY, hashlib.sha1).hexdigest()
    scheme.verify(BODY, {"x-sig": good})
    scheme.verify(BODY, {"x-sig": good.upper()})  # hex is case-insensitive
    with pytest.raises(SignatureError):
        scheme.verify(BODY, {"x-sig": hmac.new(b"k", BODY, hashlib.sha256).hexdigest()})
    assert scheme.event_id(BODY, {"x-event-id": "e-9"}) == "e-9"
    assert scheme.forward == ("X-Event-Id",)


def test_none_accepts_anything_and_forwards_configured_headers() -> None:
    scheme = scheme_for(
        source(scheme="none", allow_unsigned=True, id_header="X-Request-Id", forward_headers=["X-Kind"])
    )
    scheme.verify(b"anything", {})
    assert scheme.forward == ("X-Request-Id", "X-Kind")


def test_sign_round_trips_for_every_scheme() -> None:
    """What ``herald produce --to-receiver`` sends is what the receiver accepts."""
    for name in SIGNED:
        scheme = configured(name, [NEW, OLD])
        scheme.verify(BODY, lower(scheme.sign(BODY, event_id="evt_1")))
