"""herald settings.

Every value comes from, in order of precedence: keyword arguments, ``HERALD_*``
environment variables, an optional TOML file (``HERALD_CONFIG_FILE`` or
``--config``), then the defaults below. librdkafka properties pass through
untouched as ``HERALD_KAFKA__<PROPERTY>``, with the property's dots written as
single underscores (``HERALD_KAFKA__SASL_MECHANISM=PLAIN`` becomes
``sasl.mechanism``), so an existing SASL/SSL cluster works unchanged.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# The TOML file named by load_settings(), for the duration of that call only.
_CONFIG_FILE: ContextVar[str | None] = ContextVar("herald_config_file", default=None)

CHANNELS: tuple[str, ...] = ("email", "push", "webhook")

# Default redaction: card numbers, bearer/API tokens, email addresses in free text.
DEFAULT_REDACTIONS: tuple[str, ...] = (
    r"\b\d(?:[ -]?\d){12,18}\b",
    r"\b(?:sk|pk|rk|ghp|gho)_[A-Za-z0-9_]{8,}\b",
    r"\bxox[abposr]-[A-Za-z0-9-]{8,}",
    r"\b(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}",
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
)


DEFAULT_RATE_LIMITS: dict[str, int] = {"email": 5, "push": 20, "webhook": 60}

_COMMITS = "herald commits offsets itself, only after the work is durable"
_DURABLE = "herald waits for every in-sync replica and relies on the idempotent producer"
# librdkafka properties the passthrough must not change, and why (aliases included).
INVARIANT_KAFKA_PROPERTIES: dict[str, str] = {
    "enable.auto.commit": _COMMITS,
    "enable.auto.offset.store": _COMMITS,
    "auto.offset.reset": "a group that joins late must start at the earliest record, never skip any",
    "acks": _DURABLE,
    "request.required.acks": _DURABLE,
    "enable.idempotence": _DURABLE,
    "group.id": "each herald process names its own consumer group (herald ingest --group)",
    "bootstrap.servers": "set HERALD_KAFKA_BOOTSTRAP instead",
    "metadata.broker.list": "set HERALD_KAFKA_BOOTSTRAP instead",
    "isolation.level": "herald reads committed records only (the default)",
    "enable.partition.eof": "the batch loop does not expect end-of-partition events",
}


class PolicySettings(BaseModel):
    """Defaults from the seed article: what a user gets before they choose."""

    model_config = ConfigDict(frozen=True)

    in_app: bool = True
    email: bool = False
    push: bool = False
    webhook: bool = False
    digest_minutes: int = Field(default=5, ge=0)
    # Digest windows shorter than a minute, for tests and demos (overrides digest_minutes).
    digest_seconds: int | None = Field(default=None, ge=1)
    # Per-user, per-channel external sends per minute.
    rate_limits: dict[str, int] = Field(default_factory=lambda: {"email": 5, "push": 20, "webhook": 60})
    redactions: tuple[str, ...] = DEFAULT_REDACTIONS
    summary_chars: int = Field(default=280, ge=20, le=280)
    # Categories users cannot opt out of (security alerts, say): per-category choices are
    # refused by the API and ignored by ingest, and in-app off never hides them.
    mandatory_categories: frozenset[str] = frozenset()

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _keep_other_limits(cls, value: Any) -> Any:
        """Setting one channel's limit keeps the defaults of the others."""
        if isinstance(value, dict):
            return {**DEFAULT_RATE_LIMITS, **value}
        return value

    @field_validator("redactions")
    @classmethod
    def _compiles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redaction pattern {pattern!r} is not a valid regex: {exc}") from exc
        return value

    def channel_default(self, channel: str) -> bool:
        return bool(getattr(self, channel))

    def rate_limit(self, channel: str) -> int:
        return self.rate_limits.get(channel, 1_000_000)


_DURATION = re.compile(r"^([1-9][0-9]*)(ms|s|m|h)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """``5s``, ``1m``, ``30m``, ``2h``, ``500ms`` as seconds; the form retry topics are named in."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration: a number and a unit (ms, s, m, h), like 5s or 30m")
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


class DeliverySettings(BaseModel):
    """Channel consumers: retry tiers, attempts, and the lease on a claimed delivery."""

    model_config = ConfigDict(frozen=True)

    # One retry topic per tier, named by its delay (herald.deliveries.webhook.retry.5s);
    # the last tier repeats until max_attempts.
    retry_tiers: tuple[str, ...] = ("5s", "1m", "5m", "30m")
    max_attempts: int = Field(default=8, ge=1)
    # How long a claimed ('sending') row is ours; a consumer that dies mid-send loses it after this.
    lease_s: float = Field(default=120.0, gt=0)
    # Sends in flight per process (all partitions together). Offsets are committed per
    # partition only up to the lowest delivery not yet recorded.
    concurrency: int = Field(default=200, ge=1, le=10_000)
    # A rebalance or a shutdown lets the sends in flight finish for this long, then gives
    # the rest up uncommitted (their claims go back): never a provider's whole timeout chain.
    rebalance_grace_s: float = Field(default=5.0, ge=0)

    @field_validator("retry_tiers")
    @classmethod
    def _tiers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError('give at least one retry tier, like ["5s", "1m"]')
        seconds = [duration_seconds(t) for t in value]
        if seconds != sorted(seconds) or len(set(seconds)) != len(seconds):
            raise ValueError(f"retry tiers must grow: {list(value)}")
        return value

    def tier_seconds(self) -> list[float]:
        return [duration_seconds(t) for t in self.retry_tiers]


class BreakerSettings(BaseModel):
    """The circuit breaker per target host (channels/breaker.py)."""

    model_config = ConfigDict(frozen=True)

    # Open when at least min_attempts sends over window_s failed in failure_ratio of cases.
    failure_ratio: float = Field(default=0.7, gt=0, le=1)
    min_attempts: int = Field(default=10, ge=1)
    window_s: float = Field(default=300.0, gt=0)
    # How long an open circuit waits before one probe send.
    cooldown_s: float = Field(default=30.0, gt=0)


class WebhookSettings(BaseModel):
    """The outbound webhook provider."""

    model_config = ConfigDict(frozen=True)

    timeout_s: float = Field(default=10.0, gt=0)
    # Loopback, private, link-local and multicast targets are refused unless this is set
    # (herald dev sets it: its receivers are on loopback).
    allow_private_targets: bool = False


SMTP_TLS: tuple[str, ...] = ("none", "starttls", "implicit")


class SmtpSettings(BaseModel):
    """The email provider: one SMTP relay, a pool of kept-open connections to it."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    # The relay every email goes through; `herald deliver --channel email` refuses to start without it.
    host: str | None = None
    port: int = Field(default=587, ge=1, le=65535)
    # none: plain SMTP (a local relay); starttls: upgrade after EHLO, and refuse a server that
    # cannot; implicit: TLS from the first byte (SMTPS, port 465).
    tls: str = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    # The From header and the envelope sender: `herald <notifications@example.com>`.
    from_: str | None = Field(default=None, alias="from")
    # Per SMTP command (connect, each reply); a timeout is transient.
    timeout_s: float = Field(default=10.0, gt=0)
    # Connections kept open to the relay per process; each carries one message at a time.
    pool_size: int = Field(default=20, ge=1, le=1000)
    # Templates replacing the built-in ones (string.Template: $title, $summary, $url, $items,
    # $unsubscribe_url, $severity); every value is HTML-escaped in the HTML one.
    text_template: Path | None = None
    html_template: Path | None = None

    @field_validator("tls")
    @classmethod
    def _known_tls(cls, value: str) -> str:
        if value not in SMTP_TLS:
            raise ValueError(f"unknown tls {value!r}: use one of {', '.join(SMTP_TLS)}")
        return value

    @field_validator("from_")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not re.search(r"[^@\s<>]+@[^@\s<>]+\.?[^@\s<>]*", value):
            raise ValueError(f"{value!r} is not an email address (like herald <notify@example.com>)")
        return value

    @model_validator(mode="after")
    def _auth_pair(self) -> SmtpSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("set both username and password, or neither")
        if self.password is not None and self.tls == "none":
            raise ValueError("a password over plain SMTP (tls none) would travel in clear: use starttls")
        return self


class PushSettings(BaseModel):
    """The Web Push provider (RFC 8030/8291/8292)."""

    model_config = ConfigDict(frozen=True)

    # The application server's P-256 private key, base64url (`herald vapid generate` prints one,
    # and the public key the web app subscribes with).
    vapid_private_key: SecretStr | None = None
    # The VAPID contact: mailto:ops@example.com or an https URL.
    vapid_subject: str | None = None
    # Push services are public https endpoints; loopback and private ones (and plain http on
    # them) only with this set (tests, herald dev).
    allow_private_targets: bool = False
    timeout_s: float = Field(default=10.0, gt=0)
    # How long the push service keeps a message for an offline device (the TTL header).
    ttl_s: int = Field(default=86_400, ge=0, le=28 * 86_400)

    @field_validator("vapid_subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(mailto:[^@\s]+@\S+|https://\S+)$", value):
            raise ValueError("must be mailto:someone@example.com or an https:// URL (RFC 8292)")
        return value


class DigestSettings(BaseModel):
    """``herald digest``: when windows close, how large they grow, what a digest shows."""

    model_config = ConfigDict(frozen=True)

    # A window closes this long after its end (processing time), so late items still join it.
    grace_s: float = Field(default=30.0, ge=0)
    # Spreads the closes of windows that end together over this many seconds after the
    # grace: each user's windows close at their own fixed share of it (a hash of the user
    # id), so the digests of every user do not all leave in the same second. Membership is
    # unchanged (windows stay aligned in event time); 0 closes every window at end + grace.
    spread_s: float = Field(default=0.0, ge=0)
    # A window closes early at this many items; later items open its follow-up window.
    max_items: int = Field(default=100, ge=1)
    # Titles listed in a digest ("and M more" after them).
    titles: int = Field(default=10, ge=1, le=100)
    # How often the digest process looks for windows to close.
    tick_s: float = Field(default=1.0, gt=0)
    # The inbox in the product's web app (relative to HERALD_APP_URL): a digest's link.
    inbox_path: str = "/notifications"


class LagExporterSettings(BaseModel):
    """``herald lag-exporter``: how often it samples the broker and when a group is stalled."""

    model_config = ConfigDict(frozen=True)

    # Seconds between samples of committed offsets, end offsets and head records.
    interval_s: float = Field(default=15.0, gt=0)
    # An active group whose committed offset has not moved for this long while due records
    # wait on one of its partitions is ``stalled`` (HeraldConsumerGroupStalled adds its ``for:``).
    stalled_after_s: float = Field(default=120.0, gt=0)
    # Groups to watch besides herald's own (herald-ingest, herald-digest, herald-deliver-<channel>);
    # every other group with an offset on a topic under the prefix is found by itself.
    groups: tuple[str, ...] = ()
    # One broker call (offsets, a head record's read) waits at most this long.
    timeout_s: float = Field(default=5.0, gt=0)


class ApiSettings(BaseModel):
    """``herald api``: where it listens, how it checks bearer tokens, and its input limits."""

    model_config = ConfigDict(frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8600, ge=0, le=65535)
    # One of them at least, or `herald api` refuses to start: HS256 with a shared secret,
    # RS256 with an identity provider's public key (PEM). Both set: each token's alg picks.
    jwt_secret: SecretStr | None = None
    jwt_public_key: str | None = None
    # Checked on every token: `aud` must contain it; `iss` must equal the issuer when set.
    audience: str = Field(default="herald", min_length=1)
    issuer: str | None = None
    # Clock skew allowed on exp/nbf/iat.
    leeway_s: int = Field(default=30, ge=0, le=300)
    default_page_size: int = Field(default=30, ge=1)
    max_page_size: int = Field(default=100, ge=1, le=1000)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # Connections to PostgreSQL per API process (an async pool).
    pool_size: int = Field(default=8, ge=1, le=200)
    # Verified tokens kept (by token string) so a hot client is not re-verified per request.
    token_cache_size: int = Field(default=10_000, ge=0)
    # The live stream (GET /v1/stream). A page trades its bearer token for a stream token
    # (POST /v1/stream/token), signed with stream_secret: set the same one on every API process
    # behind one load balancer. Unset: derived from jwt_secret, else random per process.
    stream_secret: SecretStr | None = None
    stream_token_ttl_s: int = Field(default=60, ge=5, le=3600)
    # A comment line this often keeps proxies from closing an idle stream.
    stream_heartbeat_s: float = Field(default=15.0, gt=0, le=300)
    # Wake-ups a client may have pending; a client that falls this far behind is dropped and
    # reconnects with Last-Event-ID, so it never holds up the others.
    stream_queue_size: int = Field(default=64, ge=1, le=10_000)
    # Origins (https://app.example.com) whose pages may call the API and open the stream.
    cors_origins: list[str] = Field(default_factory=list)

    @field_validator("jwt_secret")
    @classmethod
    def _hs256_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes for HS256 (RFC 7518 3.2): `openssl rand -hex 32`")
        return value

    @field_validator("stream_secret")
    @classmethod
    def _stream_secret_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes: `openssl rand -hex 32`")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not re.fullmatch(r"https?://[^/\s*]+", origin):
                raise ValueError(f"{origin!r}: an origin is scheme://host[:port], no path, no wildcard")
        return value

    @field_validator("jwt_public_key")
    @classmethod
    def _pem(cls, value: str | None) -> str | None:
        if value is not None and "-----BEGIN PUBLIC KEY-----" not in value:
            raise ValueError("jwt_public_key must be a PEM public key (-----BEGIN PUBLIC KEY-----)")
        return value

    @model_validator(mode="after")
    def _page_sizes(self) -> ApiSettings:
        if self.default_page_size > self.max_page_size:
            raise ValueError("default_page_size must not exceed max_page_size")
        return self


# Verification schemes of the webhook receiver (producers/signatures.py implements them).
SCHEMES: tuple[str, ...] = ("standard-webhooks", "stripe", "github", "hmac-header", "none")
HMAC_ALGORITHMS: tuple[str, ...] = ("sha256", "sha1", "sha512")
# A source's name is a URL path segment (/webhooks/<name>) and the herald-source header.
_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# A header name as HTTP allows it (RFC 9110 token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class SourceSettings(BaseModel):
    """One sender of webhooks: how its requests are verified, and what of them goes downstream.

    ``secrets`` holds several secrets during a rotation: a request signed with any of them
    passes. ``scheme = "none"`` accepts unsigned requests, so it must be asked for twice
    (``allow_unsigned = true``): a typo in a scheme name must never open a source.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: str
    # A JSON list, or (so that a shell can source it unquoted) one secret or several separated by commas.
    secrets: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    allow_unsigned: bool = False
    # hmac-header: the header carrying the signature, the digest, how it is written, and a
    # prefix before it (e.g. "sha256="). The signed message is the raw body.
    header: str | None = None
    algorithm: str = "sha256"
    encoding: str = "hex"
    prefix: str = ""
    # stripe: how old (or how far in the future) a signed timestamp may be.
    # (standard-webhooks: 5 minutes, fixed by the specification and its library.)
    tolerance_s: int = Field(default=300, ge=1)
    # hmac-header and none: a header with the sender's event id (the record key and dedupe hint).
    id_header: str | None = None
    # Request headers put on the record as Kafka headers, besides the scheme's own
    # (GitHub's X-GitHub-Event and X-GitHub-Delivery, Standard Webhooks' webhook-id, ...).
    forward_headers: tuple[str, ...] = ()

    @field_validator("secrets", mode="before")
    @classmethod
    def _secret_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError:
                    raise ValueError("secrets: not a JSON list of strings") from None
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value not in SCHEMES:
            raise ValueError(f"unknown scheme {value!r}: use one of {', '.join(SCHEMES)}")
        return value

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        if value not in HMAC_ALGORITHMS:
            raise ValueError(f"unknown algorithm {value!r}: use one of {', '.join(HMAC_ALGORITHMS)}")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        if value not in ("hex", "base64"):
            raise ValueError(f"unknown encoding {value!r}: use hex or base64")
        return value

    @field_validator("header", "id_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        if value is not None and not _HEADER_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not an HTTP header name")
        return value

    @field_validator("forward_headers")
    @classmethod
    def _header_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an HTTP header name")
        return value

    @model_validator(mode="after")
    def _secrets_fit_the_scheme(self) -> SourceSettings:
        if self.scheme == "none":
            if not self.allow_unsigned:
                raise ValueError(
                    'scheme "none" accepts unsigned requests: set "allow_unsigned": true to mean it'
                )
            return self
        if not self.secrets or any(not s.get_secret_value() for s in self.secrets):
            raise ValueError(f"scheme {self.scheme!r} needs at least one non-empty secret in secrets")
        if self.scheme == "hmac-header" and not self.header:
            raise ValueError('scheme "hmac-header" needs "header": the header that carries the signature')
        if self.scheme == "standard-webhooks":
            for secret in self.secrets:
                standard_webhooks_key(secret.get_secret_value())
        return self


def standard_webhooks_key(secret: str) -> bytes:
    """A Standard Webhooks secret is base64, optionally prefixed ``whsec_``; checked at start-up,
    so a mistyped secret is a settings error, not a 401 for every request."""
    raw = secret.removeprefix("whsec_").rstrip("=")
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise ValueError("a standard-webhooks secret is base64 (optionally whsec_…): one of secrets is not")
    return key


class ReceiverSettings(BaseModel):
    """``herald receiver``: signed webhooks over HTTP in, records on herald.events out."""

    model_config = ConfigDict(frozen=True)

    host: str = "127.0.0.1"
    # 0 picks a free port (tests, the bench).
    port: int = Field(default=8700, ge=0, le=65535)
    sources: dict[str, SourceSettings] = Field(default_factory=dict)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    # How long a request waits for the broker's acknowledgement before a 503.
    ack_timeout_s: float = Field(default=5.0, gt=0)
    # What a 503 tells the sender to wait (Retry-After, seconds).
    retry_after_s: int = Field(default=5, ge=1)
    # On SIGTERM: how long requests in flight may take to finish, then the producer is flushed.
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    # librdkafka's linger: a few ms batch concurrent requests into one produce request.
    linger_ms: int = Field(default=2, ge=0)

    @field_validator("sources")
    @classmethod
    def _source_names(cls, value: dict[str, SourceSettings]) -> dict[str, SourceSettings]:
        for name in value:
            if not _SOURCE_NAME.fullmatch(name):
                raise ValueError(
                    f"source name {name!r}: letters, digits, '.', '_' and '-' only "
                    "(it is a URL path segment), at most 100 characters"
                )
        return value


class Settings(BaseSettings):
    """Everything a herald process needs, read once in ``main``."""

    model_config = SettingsConfigDict(
        env_prefix="HERALD_",
        env_nested_delimiter="__",
        # An empty variable is an unset one: compose files and Kubernetes manifests pass
        # `HERALD_APP_URL=` for "not configured", and the default must hold then.
        env_ignore_empty=True,
        frozen=True,
        extra="ignore",
    )

    kafka_bootstrap: str = "localhost:9092"
    # librdkafka passthrough: HERALD_KAFKA__SASL_USERNAME -> sasl.username
    kafka: dict[str, str] = Field(default_factory=dict)
    database_url: SecretStr = SecretStr("postgresql://postgres@localhost/herald")

    topic_prefix: str = "herald"
    topic_partitions: int = Field(default=6, ge=1)
    topic_replication: int = Field(default=1, ge=1)
    # Dead-letter topics herald creates keep records this long (retention.ms): the events DLQ
    # holds what upstream sent, private content included. Existing topics are left as they are.
    dlq_retention_days: float = Field(default=14.0, gt=0)

    batch_size: int = Field(default=2000, ge=1)
    # A partly filled batch waits at most this long: half of it is the median record's delay
    # at a moderate rate (`herald bench ingest --rate`: p99 ~0.2 s at 5,000/s with 100 ms).
    batch_time_ms: int = Field(default=100, ge=1)
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    max_event_bytes: int = Field(default=256 * 1024, ge=256)
    # Backoff while PostgreSQL is unreachable: doubles from min to max.
    db_backoff_min_ms: int = Field(default=250, ge=10)
    db_backoff_max_ms: int = Field(default=10_000, ge=10)
    # Server-side limits on every herald session, and TCP keepalives (a dead peer is noticed).
    db_statement_timeout_ms: int = Field(default=30_000, ge=0)
    db_idle_in_transaction_timeout_ms: int = Field(default=60_000, ge=0)
    db_keepalives_idle_s: int = Field(default=30, ge=1)

    # The source of events that name none and carry no `herald-source` header: a stable
    # name, never the physical topic, so a renamed or mirrored topic dedupes the same.
    default_source: str = Field(default="events", min_length=1, max_length=100)
    # The outbox relay: delivery rows still unpublished this long after they were written
    # (a crash, moved offsets, expired retention) are published by a sweeper in `herald ingest`.
    outbox_relay_after_s: float = Field(default=60.0, gt=0)
    outbox_relay_every_s: float = Field(default=10.0, gt=0)

    metrics_host: str = "127.0.0.1"
    # 0 picks a free port; -1 serves no metrics.
    metrics_port: int = 9400

    policy: PolicySettings = Field(default_factory=PolicySettings)
    receiver: ReceiverSettings = Field(default_factory=ReceiverSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    push: PushSettings = Field(default_factory=PushSettings)
    digest: DigestSettings = Field(default_factory=DigestSettings)
    # The product's web app: the base of relative target_urls in external messages.
    app_url: str | None = None

    api: ApiSettings = Field(default_factory=ApiSettings)
    lag_exporter: LagExporterSettings = Field(default_factory=LagExporterSettings)
    # Signs the one-click unsubscribe tokens in emails (core/unsubscribe.py); None: no links.
    unsubscribe_secret: SecretStr | None = None
    # Where herald's API is reachable from a user's mail client (unsubscribe links).
    public_url: str | None = None
    # Mapping rules for events in other shapes (TOML, see config/rules/); None: native
    # envelopes and CloudEvents only.
    rules_file: Path | None = None
    log_level: str = "INFO"
    # "text": one human-readable line per record. "json": one JSON object per line (ts, level,
    # logger, message, and topic/partition/offset/delivery_id/outcome where a line is about
    # a record or a delivery; never a payload, never a secret), for a log pipeline (core/logs.py).
    log_format: Literal["text", "json"] = "text"

    @field_validator("app_url")
    @classmethod
    def _absolute_app_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/?#\s]+", value):
            raise ValueError(f"HERALD_APP_URL must be an absolute http(s) URL, got {value!r}")
        return value

    @field_validator("unsubscribe_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (a random string: `openssl rand -hex 32`)")
        return value

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL, the API's base as users' mail clients reach it")
        return None if value is None else value.rstrip("/")

    @field_validator("kafka", mode="before")
    @classmethod
    def _dotted_properties(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k).lower().replace("_", "."): str(v) for k, v in value.items()}
        return value

    @field_validator("kafka")
    @classmethod
    def _no_invariant_overrides(cls, value: dict[str, str]) -> dict[str, str]:
        """The passthrough is for security and tuning; these properties keep herald's guarantees."""
        for name in sorted(value):
            why = INVARIANT_KAFKA_PROPERTIES.get(name)
            if why is not None:
                raise ValueError(
                    f"librdkafka property {name} is herald's own and cannot be overridden: {why}"
                )
        return value

    def kafka_client_config(self) -> dict[str, str | int | float | bool]:
        """librdkafka properties shared by every client (security, timeouts, ...)."""
        conf: dict[str, str | int | float | bool] = {"bootstrap.servers": self.kafka_bootstrap}
        conf.update(self.kafka)
        return conf

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _CONFIG_FILE.get() or os.environ.get("HERALD_CONFIG_FILE")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_file)))
        return tuple(sources)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Read settings once; ``config_file`` names an optional TOML file."""
    if config_file is None:
        return Settings(**overrides)
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"settings file not found: {path}")
    token = _CONFIG_FILE.set(str(path))
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE.reset(token)
