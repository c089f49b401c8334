"""CloudEvents 1.0, Kafka protocol binding: structured and binary mode.

- structured: a ``content-type`` header starting with ``application/cloudevents``
  (only the JSON format, ``application/cloudevents+json``); the whole event,
  attributes and ``data``, is the record value;
- binary: a ``ce_specversion`` header; every attribute is a ``ce_<name>`` header,
  the value is the data, and ``content-type`` is its ``datacontenttype`` (JSON only:
  absent, ``application/json`` or any ``…+json``).

Without a rule, the event maps onto the native envelope: ``id``, ``source`` and
``type`` from the attributes, ``time`` -> ``occurred_at``, ``subject`` -> ``user_id``
unless the data names ``user_id`` or ``recipients`` (the data wins); the data
supplies everything else (``title``, ``severity``, ``body``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from core.envelope import load_json, load_object
from core.errors import SchemaViolation

BINARY = "binary"
STRUCTURED = "structured"
SPECVERSION = "1.0"
HeaderValue = bytes | str | None
HeaderPairs = Iterable[tuple[str, HeaderValue]] | Mapping[str, HeaderValue]


@dataclass(frozen=True, slots=True)
class CloudEvent:
    id: str
    source: str
    type: str
    time: str | None
    subject: str | None
    data: Any  # any JSON value, None when the event has no data
    mode: str


def header_map(headers: HeaderPairs | None) -> dict[str, str]:
    """Header names lower-cased (HTTP bridges differ in case), values as text; the last one wins."""
    out: dict[str, str] = {}
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    for name, raw in pairs:
        if raw is None:
            continue
        out[name.lower()] = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
    return out


def mode_of(headers: Mapping[str, str]) -> str | None:
    """Which binding mode a record uses, or None when it is not a CloudEvent."""
    if "ce_specversion" in headers:
        return BINARY
    if headers.get("content-type", "").lower().startswith("application/cloudevents"):
        return STRUCTURED
    return None


def decode(value: bytes, headers: Mapping[str, str]) -> CloudEvent | None:
    """The CloudEvent in a record (``None`` when it is not one); ``InvalidEvent`` when malformed."""
    mode = mode_of(headers)
    if mode == BINARY:
        content_type = headers.get("content-type")
        if content_type is not None and not _is_json(content_type):
            raise SchemaViolation(f"CloudEvent data must be JSON, got content-type {content_type!r}")
        data = load_json(value) if value.strip() else None
        attrs = {k[3:]: v for k, v in headers.items() if k.startswith("ce_")}
        return _build(attrs, data, mode)
    if mode == STRUCTURED:
        content_type = headers["content-type"].split(";")[0].strip().lower()
        if content_type != "application/cloudevents+json":
            raise SchemaViolation(f"only the JSON event format is supported, got {content_type!r}")
        obj = load_object(value)
        if "data_base64" in obj:
            raise SchemaViolation("data_base64: binary CloudEvent data is not supported (JSON only)")
        return _build(obj, obj.get("data"), mode)
    return None


def _is_json(content_type: str) -> bool:
    base = content_type.split(";")[0].strip().lower()
    return base == "application/json" or base.endswith("+json") or base == "text/json"


def _build(attrs: Mapping[str, Any], data: Any, mode: str) -> CloudEvent:
    version = attrs.get("specversion")
    if version != SPECVERSION:
        raise SchemaViolation(f"specversion: expected {SPECVERSION!r}, got {version!r}")
    for name in ("id", "source", "type"):
        value = attrs.get(name)
        if not isinstance(value, str) or not value:
            raise SchemaViolation(f"CloudEvent attribute {name}: a non-empty string is required")
    for name in ("time", "subject"):
        if attrs.get(name) is not None and not isinstance(attrs[name], str):
            raise SchemaViolation(f"CloudEvent attribute {name}: must be a string")
    return CloudEvent(
        id=attrs["id"],
        source=attrs["source"],
        type=attrs["type"],
        time=attrs.get("time"),
        subject=attrs.get("subject") or None,
        data=data,
        mode=mode,
    )


def to_native(ce: CloudEvent) -> dict[str, Any]:
    """The envelope fields of an event no rule maps: the data, plus the attributes."""
    if ce.data is None:
        data: dict[str, Any] = {}
    elif isinstance(ce.data, dict):
        data = ce.data
    else:
        raise SchemaViolation("data: must be a JSON object carrying title (or write a rule for this type)")
    out = dict(data)
    out["id"] = ce.id
    out["source"] = ce.source
    out["type"] = ce.type
    if ce.time is not None:
        out["occurred_at"] = ce.time
    if data.get("user_id") is None and data.get("recipients") is None and ce.subject is not None:
        out["user_id"] = ce.subject
    return out
