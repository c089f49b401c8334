"""The native event envelope: validation and expansion into notifications."""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from config.settings import PolicySettings
from core.errors import NotAnObject, NotJson, SchemaViolation, TooLarge
from core.ids import uuid5
from core.redaction import redact_then_truncate, truncate

Severity = Literal["info", "success", "warning", "critical"]
EXTERNAL_SEVERITIES = frozenset({"warning", "critical"})

# Notification ids are uuid5(user_id NUL idempotency_key): the same event always
# maps onto the same row, in every process, before any database round trip.
# A JSON \u0000 escape: an odd run of backslashes before u0000 (an even run is text).
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")

_HIGH_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])")

# Browsers read "/\\evil.com" or "/<tab>/evil.com" as "//evil.com".
_UNSAFE_URL_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")

NOTIFICATION_NS = uuid.UUID("6c1f8e2a-3b57-4d6e-9a0c-2f4b8d1e7a90")

# Limits in UTF-8 bytes for every id and key field (character limits let a 200-character
# id be 800 bytes). user_id is indexed (inbox, unread, rate limits), so its limit keeps an
# index row far below PostgreSQL's ~2.7 kB; the idempotency key is indexed by its hash
# (the notification id), never by itself, so any key that passes here can be stored.
BYTE_LIMITS: dict[str, int] = {
    "id": 1000,
    "type": 400,
    "user_id": 400,
    "source": 400,
    "category": 200,
    "resource_id": 1000,
    "idempotency_key": 1000,
    "batch_key": 1000,
}
RECIPIENT_BYTES = 400
# Free text is checked for lone surrogates only (its character limits bound its size).
_TEXT_FIELDS = ("title", "body", "summary", "target_url")

Recipient = Annotated[str, Field(min_length=1, max_length=200)]


class Envelope(BaseModel):
    """One JSON object per record. Unknown fields are ignored, not rejected."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1, max_length=500)
    type: str = Field(min_length=1, max_length=200)
    title: str = Field(min_length=1, max_length=200)
    user_id: str | None = Field(default=None, min_length=1, max_length=200)
    recipients: list[Recipient] | None = Field(default=None, min_length=1, max_length=10_000)
    source: str | None = Field(default=None, min_length=1, max_length=200)
    severity: Severity = "info"
    body: str | None = Field(default=None, max_length=10_000)
    summary: str | None = Field(default=None, max_length=280)
    category: str | None = Field(default=None, max_length=100)
    target_url: str | None = Field(default=None, max_length=2000)
    resource_id: str | None = Field(default=None, min_length=1, max_length=500)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=500)
    batch_key: str | None = Field(default=None, max_length=500)
    occurred_at: AwareDatetime | None = None
    data: dict[str, Any] | None = None
    sensitive: bool = False

    @field_validator("target_url")
    @classmethod
    def _relative_or_https(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if _UNSAFE_URL_CHARS.search(value):
            # Browsers read "/\\evil.com" or "/<tab>/evil.com" as "//evil.com": another host.
            raise ValueError("target_url must not contain backslashes or control characters")
        if value.startswith("https://") and len(value) > len("https://"):
            return value
        if value.startswith("/") and not value.startswith("//"):
            return value
        raise ValueError("target_url must be a relative path (/...) or an https:// URL")

    @field_validator("recipients")
    @classmethod
    def _recipients_not_blank(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not r for r in value):
            raise ValueError("recipients must be non-empty strings")
        return value

    @model_validator(mode="after")
    def _one_audience(self) -> Envelope:
        if self.user_id is None and self.recipients is None:
            raise ValueError("either user_id or recipients is required")
        return self


def check_storable(env: Envelope, *, plain_ascii: bool = False) -> None:
    """Byte limits on ids and keys; text PostgreSQL can store; finite numbers in ``data``.

    ``plain_ascii``: the record's raw JSON is ASCII with no ``\\u`` escape, so every
    string in it is ASCII: a character limit is then a byte limit, and every character
    limit of the model is within its byte limit, so only ``data``'s numbers need a look.
    (The hot path: this check costs a fraction of a microsecond there.)
    """
    try:
        if not plain_ascii:
            for name, limit in BYTE_LIMITS.items():
                _fits(name, getattr(env, name), limit)
            for r in env.recipients or ():
                _fits("recipients[]", r, RECIPIENT_BYTES)
            for name in _TEXT_FIELDS:
                _fits(name, getattr(env, name), 1 << 30)
        if env.data:
            _check_json(env.data, "data")
    except ValueError as exc:
        raise SchemaViolation(str(exc)) from None


def _fits(name: str, value: str | None, limit: int) -> None:
    """``value`` is valid UTF-8 (no lone surrogate) and at most ``limit`` bytes."""
    if value is None or (value.isascii() and len(value) <= limit):
        return
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise ValueError(f"{name} contains a lone surrogate, which is not valid UTF-8") from None
    if size > limit:
        raise ValueError(f"{name} is {size} bytes in UTF-8, over the limit of {limit}")


def _check_json(value: object, where: str) -> None:
    """Non-finite numbers and lone surrogates cannot be stored in jsonb (nor read by most peers)."""
    t = type(value)
    if t is str:
        _fits(where, value, 1 << 30)  # type: ignore[arg-type]
    elif t is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise ValueError(f"{where} holds a non-finite number (NaN or Infinity)")
    elif t is dict:
        for k, v in value.items():  # type: ignore[attr-defined]
            _fits(where, k, 1 << 30)
            _check_json(v, where)
    elif t is list:
        for v in value:  # type: ignore[attr-defined]
            _check_json(v, where)


@dataclass(slots=True)
class Notification:
    """One row of the inbox, as ingest will insert it. Treat as immutable.

    Not ``frozen``: a frozen dataclass sets each of its 15 fields through
    ``object.__setattr__``, which tripled construction time on the hot path.
    """

    id: uuid.UUID
    user_id: str
    source: str
    type: str
    category: str | None
    severity: str
    title: str
    body: str | None
    summary: str | None
    target_url: str | None
    data: dict[str, Any] | None
    sensitive: bool
    idempotency_key: str
    batch_key: str | None
    occurred_at: datetime

    @property
    def external(self) -> bool:
        return self.severity in EXTERNAL_SEVERITIES


def check_raw(value: bytes | None, *, max_bytes: int) -> bytes:
    """What every record must pass before anyone reads it: a value, the size limit, no NUL."""
    if value is None:
        raise NotJson("record has no value")
    if len(value) > max_bytes:
        raise TooLarge(f"record is {len(value)} bytes, over the limit of {max_bytes}")
    if b"\\u0000" in value and _NUL_ESCAPE.search(value):
        # Valid JSON, but PostgreSQL can store NUL in neither text nor jsonb.
        raise SchemaViolation("contains a NUL character (\\u0000), which cannot be stored")
    return value


def parse(value: bytes | None, *, max_bytes: int) -> Envelope:
    """Validate one record value; raises an ``InvalidEvent`` subclass naming why."""
    raw = check_raw(value, max_bytes=max_bytes)
    try:
        env = Envelope.model_validate_json(raw)
    except ValidationError as exc:
        err = _classify(exc)
        if isinstance(err, NotJson) and _HIGH_SURROGATE_ESCAPE.search(raw):
            # The parser calls a high surrogate with no low one "unexpected end of hex escape".
            err = SchemaViolation(f"{err.message} (a lone surrogate is not valid UTF-8)")
        raise err from None
    check_storable(env, plain_ascii=raw.isascii() and b"\\u" not in raw)
    return env


def load_json(value: bytes) -> Any:
    """Any JSON value; ``NotJson`` when it is not JSON."""
    try:
        return json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotJson(f"not valid JSON: {exc}") from None
    except RecursionError:
        # Nesting deeper than the interpreter's stack (a few hundred KB of "[[[["): a poison
        # record, not a crash. pydantic's parser (the native path) has a limit of its own.
        raise NotJson("not valid JSON: nested too deeply") from None


def load_object(value: bytes) -> dict[str, Any]:
    """A JSON object; ``NotJson`` or ``NotAnObject`` naming why not."""
    obj = load_json(value)
    if not isinstance(obj, dict):
        raise NotAnObject("the record is JSON but not an object")
    return obj


def from_object(obj: dict[str, Any], context: str = "") -> Envelope:
    """Validate an already-decoded object (CloudEvent data, a rule's output) as an envelope."""
    try:
        env = Envelope.model_validate(obj)
    except ValidationError as exc:
        err = _classify(exc)
        if context:
            raise SchemaViolation(f"{context}: {err.message}") from None
        raise err from None
    try:
        check_storable(env)
    except SchemaViolation as exc:
        raise SchemaViolation(f"{context}: {exc.message}" if context else exc.message) from None
    return env


def looks_native(obj: dict[str, Any]) -> bool:
    """Carries every key the native envelope requires (values unchecked).

    With mapping rules configured, an object no rule matches is read as a native
    envelope only when it looks native: then a bad value is a schema violation;
    otherwise the record is unmapped.
    """
    return "id" in obj and "type" in obj and "title" in obj and ("user_id" in obj or "recipients" in obj)


def _classify(exc: ValidationError) -> SchemaViolation | NotJson | NotAnObject:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        if "surrogate" in first["msg"]:
            # Valid JSON syntax, but not valid Unicode: nothing can store or send it.
            return SchemaViolation(f"{first['msg']} (a lone surrogate is not valid UTF-8)")
        return NotJson(f"not valid JSON: {first['msg']}")
    if first["type"] == "model_type" and not first["loc"]:
        return NotAnObject("the record is JSON but not an object")
    described = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors[:5])
    return SchemaViolation(described)


def idempotency_key(env: Envelope, source: str, *, content_keyed: bool = False) -> str:
    """The policy's chain, first that applies (DESIGN.md, Policy), each tier tagged.

    - ``k:<key>``: the event's explicit ``idempotency_key``;
    - ``r:<len(type)>:<type>:<resource_id>``: the same resource failing twice is one
      notification (the user is part of the dedupe key already);
    - ``s:<len(source)>:<source>:<id>``: the event's own id at its source;
    - ``h:<sha256:…>``: a mapped record with no id at all (``content_keyed``).

    The tag keeps tiers apart (an explicit key never equals a derived one) and the
    length prefix keeps parts apart (``a:b`` + ``c`` never equals ``a`` + ``b:c``).
    This format is stored data: see the README's compatibility rule before changing it.
    """
    if env.idempotency_key:
        return ("h:" if content_keyed else "k:") + env.idempotency_key
    if env.resource_id:
        return f"r:{len(env.type)}:{env.type}:{env.resource_id}"
    return f"s:{len(source)}:{source}:{env.id}"


def content_key(value: bytes) -> str:
    """Last link of the chain, for mapped events with no id at all."""
    return "sha256:" + hashlib.sha256(value).hexdigest()


def default_summary(env: Envelope, limit: int, redactions: tuple[str, ...] = ()) -> str | None:
    """The explicit summary, else the start of the body, unless sensitive.

    For ``warning`` and ``critical`` (the severities that leave the system) the body is
    redacted whole, then cut: cutting first can leave a secret's fragment that no pattern
    matches. Other severities never leave, so their in-app summary is only cut (and the
    regexes are not run over every body on the hot path).
    """
    if env.summary is not None:
        return env.summary
    if env.sensitive or not env.body:
        return None
    text = " ".join(env.body.split())
    if env.severity in EXTERNAL_SEVERITIES:
        return redact_then_truncate(text, redactions, limit)
    return truncate(text, limit)


def expand(
    env: Envelope,
    *,
    default_source: str,
    record_time: datetime | None,
    summary_chars: int = 280,
    redactions: tuple[str, ...] = (),
    content_keyed: bool = False,
) -> list[Notification]:
    """One notification per recipient, each with its idempotency key and id.

    ``default_source`` names the source of an event that names none: the record's
    ``herald-source`` header, else ``HERALD_DEFAULT_SOURCE``; never the physical topic.
    """
    source = env.source or default_source
    occurred_at = env.occurred_at or record_time or datetime.now(UTC)
    summary = default_summary(env, summary_chars, redactions)
    users = env.recipients if env.recipients is not None else [env.user_id or ""]
    key = idempotency_key(env, source, content_keyed=content_keyed)
    seen: set[str] = set()
    out: list[Notification] = []
    for user_id in users:
        if user_id in seen:
            continue
        seen.add(user_id)
        out.append(
            Notification(
                id=uuid5(NOTIFICATION_NS, f"{user_id}\x00{key}"),
                user_id=user_id,
                source=source,
                type=env.type,
                category=env.category,
                severity=env.severity,
                title=env.title,
                body=env.body,
                summary=summary,
                target_url=env.target_url,
                data=env.data,
                sensitive=env.sensitive,
                idempotency_key=key,
                batch_key=env.batch_key,
                occurred_at=occurred_at,
            )
        )
    return out


def expand_all(
    envelopes: Iterable[Envelope],
    *,
    policy: PolicySettings,
    default_source: str,
    record_time: datetime | None,
    content_keyed: bool = False,
) -> Iterator[Notification]:
    """``expand`` with the policy's summary limit and redactions: what ingest, ``herald rules
    test`` and the bench's baseline all do with the envelopes of one record."""
    for env in envelopes:
        yield from expand(
            env,
            default_source=default_source,
            record_time=record_time,
            summary_chars=policy.summary_chars,
            redactions=policy.redactions,
            content_keyed=content_keyed,
        )
