"""Webhook signature schemes: verify a request over its raw bytes, or sign one (``herald produce
--to-receiver``, the tests and the bench send requests exactly as the senders would).

Every comparison of a signature is constant-time (``hmac.compare_digest``, inside the
``standardwebhooks`` library for that scheme). A source may hold several secrets while one
is rotated: a request signed with any of them passes. A failure raises ``SignatureError``
with a short reason that is safe to log: it never holds the body, a secret, or a digest.

Headers are looked up by lower-case name, as Starlette's ``Headers`` (case-insensitive)
and a plain dict of lower-cased names both allow.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from config.settings import SourceSettings, standard_webhooks_key
from core.errors import PermanentError
from core.webhooks import signed_headers

NO_MATCH = "no matching signature"


class SignatureError(PermanentError):
    """The request is not signed by this source: missing or bad signature, stale timestamp."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Scheme(Protocol):
    # Request headers a record of this source carries downstream (canonical spelling).
    forward: tuple[str, ...]

    def verify(self, body: bytes, headers: Mapping[str, str], now: float | None = None) -> None:
        """Return if the request is signed with one of the secrets; raise ``SignatureError``."""

    def event_id(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        """The sender's own id of this event, when it sends one (the record key uses it)."""

    def sign(self, body: bytes, *, event_id: str, now: float | None = None) -> dict[str, str]:
        """The headers a sender would add to ``body`` (with the first secret)."""


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _secrets(source: SourceSettings) -> list[bytes]:
    return [s.get_secret_value().encode() for s in source.secrets]


_SW_ENTRY = re.compile(r"^v[0-9]+,[A-Za-z0-9+/=]+$")


class StandardWebhooks:
    """``webhook-id``, ``webhook-timestamp``, ``webhook-signature``: v1 HMAC-SHA256 over
    ``id.timestamp.body``, 5 minutes of tolerance either way; by the ``standardwebhooks`` library.

    The library reads its own clock, so ``now`` only applies to ``sign``.
    """

    forward: tuple[str, ...] = ("webhook-id", "webhook-timestamp")

    def __init__(self, secrets: Sequence[str]) -> None:
        for secret in secrets:
            standard_webhooks_key(secret)  # base64 or whsec_…, as the settings checked
        self._secrets = list(secrets)
        self._hooks = [Webhook(secret) for secret in secrets]

    def verify(self, body: bytes, headers: Mapping[str, str], now: float | None = None) -> None:
        wanted = {
            name: headers.get(name) for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
        }
        missing = [name for name, value in wanted.items() if not value]
        if missing:
            raise SignatureError(f"missing {', '.join(missing)}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise SignatureError(
                "body is not UTF-8, so it cannot carry a standard-webhooks signature"
            ) from None
        plain = {k: v for k, v in wanted.items() if v is not None}
        # Checked here, not left to the library: standardwebhooks 1.3 answers "no matching
        # signature" for a header with no "v<n>,<signature>" entry at all, where 1.1 raised.
        if not any(_SW_ENTRY.match(e) for e in plain["webhook-signature"].split(" ")):
            raise SignatureError("malformed webhook-signature")
        last = NO_MATCH
        for hook in self._hooks:
            try:
                hook.verify(text, plain, json_parse=False)
                return
            except WebhookVerificationError as exc:
                last = str(exc).lower()
                if NO_MATCH in last:
                    last = NO_MATCH
                else:
                    break  # a timestamp or header problem: the same for every secret
            except (ValueError, binascii.Error):
                # An entry without "v1,", or a signature that is not base64.
                raise SignatureError("malformed webhook-signature") from None
        raise SignatureError(last)

    def event_id(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        return headers.get("webhook-id") or None

    def sign(self, body: bytes, *, event_id: str, now: float | None = None) -> dict[str, str]:
        return signed_headers(self._secrets[0], event_id, body, now)


class Stripe:
    """``Stripe-Signature: t=<unix>,v1=<hex>[,v1=…]``: HMAC-SHA256 of ``<t>.<body>`` with the
    endpoint's signing secret (``whsec_…``, used as it is), within ``tolerance_s`` of now,
    in the past or the future."""

    forward: tuple[str, ...] = ()

    def __init__(self, secrets: Sequence[bytes], tolerance_s: int) -> None:
        self._secrets = list(secrets)
        self._tolerance = tolerance_s

    def verify(self, body: bytes, headers: Mapping[str, str], now: float | None = None) -> None:
        header = headers.get("stripe-signature")
        if not header:
            raise SignatureError("missing Stripe-Signature")
        stamp: int | None = None
        candidates: list[bytes] = []
        for item in header.split(","):
            key, _, value = item.strip().partition("=")
            if key == "t":
                try:
                    stamp = int(value)
                except ValueError:
                    raise SignatureError("malformed Stripe-Signature timestamp") from None
            elif key == "v1":
                try:
                    candidates.append(bytes.fromhex(value))
                except ValueError:
                    continue  # not hex: cannot match
        if stamp is None or not candidates:
            raise SignatureError("Stripe-Signature without t= or v1=")
        age = _now(now) - stamp
        if age > self._tolerance:
            raise SignatureError("timestamp too old")
        if age < -self._tolerance:
            raise SignatureError("timestamp too new")
        signed = str(stamp).encode() + b"." + body
        for secret in self._secrets:
            expected = hmac.new(secret, signed, hashlib.sha256).digest()
            if any(hmac.compare_digest(expected, c) for c in candidates):
                return
        raise SignatureError(NO_MATCH)

    def event_id(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        """Stripe names the event in the body (``{"id": "evt_…"}``), not in a header."""
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested past the stack
            return None
        value = parsed.get("id") if isinstance(parsed, dict) else None
        return value if isinstance(value, str) and value else None

    def sign(self, body: bytes, *, event_id: str, now: float | None = None) -> dict[str, str]:
        stamp = int(_now(now))
        digest = hmac.new(self._secrets[0], str(stamp).encode() + b"." + body, hashlib.sha256).hexdigest()
        return {"Stripe-Signature": f"t={stamp},v1={digest}"}


class HmacHeader:
    """One header holding ``prefix + encode(HMAC(secret, body))``: GitHub's scheme, and many others."""

    def __init__(
        self,
        secrets: Sequence[bytes],
        *,
        header: str,
        algorithm: str = "sha256",
        encoding: str = "hex",
        prefix: str = "",
        id_header: str | None = None,
        forward: tuple[str, ...] = (),
    ) -> None:
        self._secrets = list(secrets)
        self._header = header
        self._digest = getattr(hashlib, algorithm)
        self._encoding = encoding
        self._prefix = prefix
        self._id_header = id_header
        self.forward = tuple(dict.fromkeys((*((id_header,) if id_header else ()), *forward)))

    def verify(self, body: bytes, headers: Mapping[str, str], now: float | None = None) -> None:
        value = headers.get(self._header.lower())
        if not value:
            raise SignatureError(f"missing {self._header}")
        if not value.startswith(self._prefix):
            raise SignatureError(f"{self._header} does not start with {self._prefix!r}")
        try:
            given = self._decode(value[len(self._prefix) :].strip())
        except (ValueError, binascii.Error):
            raise SignatureError(f"{self._header} is not {self._encoding}") from None
        for secret in self._secrets:
            if hmac.compare_digest(hmac.new(secret, body, self._digest).digest(), given):
                return
        raise SignatureError(NO_MATCH)

    def _decode(self, text: str) -> bytes:
        if self._encoding == "hex":
            return bytes.fromhex(text)
        return base64.b64decode(text, validate=True)

    def event_id(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        return (headers.get(self._id_header.lower()) or None) if self._id_header else None

    def sign(self, body: bytes, *, event_id: str, now: float | None = None) -> dict[str, str]:
        digest = hmac.new(self._secrets[0], body, self._digest).digest()
        text = digest.hex() if self._encoding == "hex" else base64.b64encode(digest).decode()
        out = {self._header: self._prefix + text}
        if self._id_header:
            out[self._id_header] = event_id
        return out


GITHUB_FORWARD = (
    "X-GitHub-Event",
    "X-GitHub-Delivery",
    "X-GitHub-Hook-ID",
    "X-GitHub-Hook-Installation-Target-ID",
    "X-GitHub-Hook-Installation-Target-Type",
)


def github(secrets: Sequence[bytes]) -> HmacHeader:
    """``X-Hub-Signature-256: sha256=<hex>``; the event is named by ``X-GitHub-Event`` and
    identified by ``X-GitHub-Delivery``, which the shipped rules read as Kafka headers."""
    return HmacHeader(
        secrets,
        header="X-Hub-Signature-256",
        prefix="sha256=",
        id_header="X-GitHub-Delivery",
        forward=GITHUB_FORWARD,
    )


class Unsigned:
    """``scheme = "none"``: anyone who can reach the port may post (enabled explicitly per source)."""

    def __init__(self, id_header: str | None) -> None:
        self._id_header = id_header
        self.forward: tuple[str, ...] = (id_header,) if id_header else ()

    def verify(self, body: bytes, headers: Mapping[str, str], now: float | None = None) -> None:
        return

    def event_id(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        return (headers.get(self._id_header.lower()) or None) if self._id_header else None

    def sign(self, body: bytes, *, event_id: str, now: float | None = None) -> dict[str, str]:
        return {self._id_header: event_id} if self._id_header else {}


def scheme_for(source: SourceSettings) -> Scheme:
    """The verifier a source's settings describe (settings validated the combination)."""
    secrets = _secrets(source)
    scheme: Scheme
    if source.scheme == "standard-webhooks":
        scheme = StandardWebhooks([s.get_secret_value() for s in source.secrets])
    elif source.scheme == "stripe":
        scheme = Stripe(secrets, source.tolerance_s)
    elif source.scheme == "github":
        scheme = github(secrets)
    elif source.scheme == "hmac-header":
        assert source.header is not None
        scheme = HmacHeader(
            secrets,
            header=source.header,
            algorithm=source.algorithm,
            encoding=source.encoding,
            prefix=source.prefix,
            id_header=source.id_header,
        )
    else:
        scheme = Unsigned(source.id_header)
    if source.forward_headers:
        scheme.forward = tuple(dict.fromkeys((*scheme.forward, *source.forward_headers)))
    return scheme
