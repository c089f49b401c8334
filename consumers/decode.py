"""One record in, native envelopes out: picks native, CloudEvents or a mapping rule.

Per record, in this order:

1. a ``ce_specversion`` header, or a ``content-type: application/cloudevents…``
   header, makes it a CloudEvent (``consumers/cloudevents.py``). A rule that matches
   the event's type or source maps its data; otherwise the data and attributes
   are read as a native envelope;
2. with no rules file, anything else is a native envelope, exactly as before rules
   existed (its schema violations are ``schema``);
3. with a rules file, the first rule that matches maps the record (type, source,
   topic, headers or fields; see ``consumers/rules.py``);
4. no rule matched: a JSON object that carries every key the native envelope
   requires (``id``, ``type``, ``title``, and ``user_id`` or ``recipients``) is a
   native envelope, and a bad value in it is ``schema``; anything else is
   ``unmapped``.

Size, NUL, not-JSON and not-an-object checks come first in every case. Pure CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from consumers import cloudevents
from consumers.cloudevents import HeaderPairs, header_map, mode_of
from consumers.rules import CompiledRule, Record, RuleSet
from core.envelope import Envelope, check_raw, from_object, load_json, looks_native, parse
from core.errors import NotAnObject, Unmapped

NATIVE = "native"
CLOUDEVENT = "cloudevent"
_NO_HEADERS: Mapping[str, str] = {}


@dataclass(slots=True)
class Decoded:
    """The envelopes one record became, and how it was read."""

    envelopes: list[Envelope]
    via: str  # native, cloudevent, or rule:<name>
    content_keyed: bool = False  # the idempotency key is the SHA-256 of the value


class Decoder:
    """Built once at start-up; call it per record. Raises ``InvalidEvent`` naming why not."""

    def __init__(self, *, max_bytes: int, rules: RuleSet | None = None) -> None:
        self._max_bytes = max_bytes
        self._rules = rules if rules else None

    @property
    def rules(self) -> RuleSet | None:
        return self._rules

    def __call__(self, value: bytes | None, headers: HeaderPairs | None, topic: str) -> Decoded:
        h = _NO_HEADERS
        if headers:
            h = header_map(headers)
            if mode_of(h) is not None:
                return self._cloudevent(check_raw(value, max_bytes=self._max_bytes), h, topic)
        if self._rules is None:
            # The hot path: one pass of pydantic's JSON parser, nothing more.
            return Decoded([parse(value, max_bytes=self._max_bytes)], NATIVE)
        raw = check_raw(value, max_bytes=self._max_bytes)
        doc = load_json(raw)
        if not isinstance(doc, dict):
            raise NotAnObject("the record is JSON but not an object")
        rec = Record(raw, doc, h, topic)
        rule = self._rules.match(rec)
        if rule is not None:
            return self._mapped(rule, rec)
        if looks_native(doc):
            return Decoded([from_object(doc)], NATIVE)
        missing = [k for k in ("id", "type", "title") if k not in doc]
        if "user_id" not in doc and "recipients" not in doc:
            missing.append("user_id/recipients")
        raise Unmapped(
            f"no rule in {self._rules.origin} matched, and it is not a native envelope "
            f"(missing {', '.join(missing)})"
        )

    def _cloudevent(self, raw: bytes, h: Mapping[str, str], topic: str) -> Decoded:
        ce = cloudevents.decode(raw, h)
        assert ce is not None  # mode_of said it is one
        if self._rules is not None:
            rec = Record(raw, ce.data, h, topic, ce)
            rule = self._rules.match(rec)
            if rule is not None:
                return self._mapped(rule, rec)
        return Decoded([from_object(cloudevents.to_native(ce), "CloudEvent")], CLOUDEVENT)

    @staticmethod
    def _mapped(rule: CompiledRule, rec: Record) -> Decoded:
        m = rule.apply(rec)
        envs = [from_object(e, f"rule {rule.name!r}") for e in m.envelopes]
        return Decoded(envs, f"rule:{rule.name}", m.content_keyed)
