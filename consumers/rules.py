"""Mapping rules: any JSON on the bus -> native envelopes, by configuration.

A rules file (TOML) is a list of ``[[rule]]`` tables, tried in file order; the first
rule whose ``match`` holds maps the record. A rule has:

- ``match``: conditions that must all hold: ``type``, ``source`` (the value's
  top-level ``type``/``source``, or a CloudEvent's attributes), ``topic``,
  ``headers`` (name -> value; names are case-insensitive) and ``fields``
  (path -> value). Each value is a glob pattern (``invoice.*``) or a list of them;
- ``fields``: named values read from the record. A field is a path (see
  ``consumers/paths.py``) into the value, ``header:NAME`` for a Kafka header, or
  ``ce:ATTR`` for a CloudEvent attribute; or a table ``{ path, default, findall }``,
  where ``findall`` is a regex whose matches (group 1 when it has one) become a list;
- ``id``, ``occurred_at``: names of fields (the event's own id and time);
  ``type``, ``source``: templates shared by every emit;
- ``[[rule.emit]]``: one notification (or one per recipient) per emit. ``to`` names
  the field holding the recipient (a string) or recipients (a list; an empty list
  skips the emit). ``title``, ``summary``, ``body``, ``type``, ``source``,
  ``category``, ``target_url``, ``resource_id``, ``idempotency_key`` are templates;
  ``severity`` and ``batch_key`` are fixed, or ``{ field, map, default }`` lookups.

Templates are ``string.Template``: ``${name}`` inserts a field, ``$$`` is a dollar.
Nothing in a template is evaluated, and a template naming a field the record lacks
is an error (reason ``mapping``), never an empty string. Every reference is checked
against ``fields`` when the file is loaded, so a typo stops the process at start-up.

Identity: with more than one emit, each emit's id is ``<event id>:<emit name>``, so
the author of an issue who is also mentioned gets both notifications. A record with
no id at all (no ``id`` field, not a CloudEvent) falls back to the last link of the
idempotency chain: the SHA-256 of the record value.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from string import Template
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from consumers.cloudevents import CloudEvent
from consumers.paths import MISSING, compile_path, resolve
from core.envelope import Severity, content_key
from core.errors import ConfigError, MappingFailed, NoRecipients

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SEVERITIES = ("info", "success", "warning", "critical")
TEMPLATE_KEYS = (
    "type",
    "source",
    "title",
    "summary",
    "body",
    "category",
    "target_url",
    "resource_id",
    "idempotency_key",
)
CE_ATTRS = ("id", "source", "type", "time", "subject")

Patterns = str | list[str]


_SUFFIXES = (".toml", ".yaml", ".yml")  # rules files, in a folder


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldSpec(_Strict):
    path: str
    default: str | None = None
    findall: str | None = None

    @field_validator("path")
    @classmethod
    def _path_compiles(cls, value: str) -> str:
        if value.startswith("header:"):
            if not value[len("header:") :]:
                raise ValueError("header: needs a header name, e.g. header:X-GitHub-Event")
        elif value.startswith("ce:"):
            if value[3:] not in CE_ATTRS:
                raise ValueError(f"ce: reads one of {', '.join(CE_ATTRS)}")
        else:
            compile_path(value)
        return value

    @field_validator("findall")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                if re.compile(value).groups > 1:
                    raise ValueError("findall: use at most one capturing group")
            except re.error as exc:
                raise ValueError(f"findall is not a valid regex: {exc}") from exc
        return value


class Lookup(_Strict):
    """A value read from a field and looked up in ``map``; ``default`` when absent."""

    field: str
    map: dict[str, str]
    default: str | None = None


class Emit(_Strict):
    name: str = "default"
    to: str | None = None
    # A field naming who is never told (one user or a list): the actor, usually.
    exclude: str | None = None
    title: str
    summary: str | None = None
    body: str | None = None
    type: str | None = None
    source: str | None = None
    category: str | None = None
    target_url: str | None = None
    resource_id: str | None = None
    idempotency_key: str | None = None
    severity: Severity | Lookup = "info"
    batch_key: str | Lookup | None = None
    sensitive: bool = False

    @field_validator("severity")
    @classmethod
    def _severity_map(cls, value: Severity | Lookup) -> Severity | Lookup:
        if isinstance(value, Lookup):
            bad = sorted({v for v in [*value.map.values(), value.default] if v is not None} - set(SEVERITIES))
            if bad:
                raise ValueError(f"lookup values must be one of {', '.join(SEVERITIES)}; got {bad}")
        return value


class Match(_Strict):
    type: Patterns | None = None
    source: Patterns | None = None
    topic: Patterns | None = None
    headers: dict[str, Patterns] = Field(default_factory=dict)
    fields: dict[str, Patterns] = Field(default_factory=dict)

    @field_validator("fields")
    @classmethod
    def _paths_compile(cls, value: dict[str, Patterns]) -> dict[str, Patterns]:
        for path in value:
            compile_path(path)
        return value

    @model_validator(mode="after")
    def _something(self) -> Match:
        if not (self.type or self.source or self.topic or self.headers or self.fields):
            raise ValueError("match needs at least one of type, source, topic, headers, fields")
        return self


class Rule(_Strict):
    name: str = Field(min_length=1)
    match: Match
    fields: dict[str, FieldSpec] = Field(default_factory=dict)
    id: str | None = None
    occurred_at: str | None = None
    type: str | None = None
    source: str | None = None
    emit: list[Emit] = Field(min_length=1)

    @field_validator("fields", mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"path": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _references(self) -> Rule:
        for name in self.fields:
            if not _NAME.fullmatch(name):
                raise ValueError(f"fields.{name}: a field name is letters, digits and _")
        for key in ("id", "occurred_at"):
            self._known(key, getattr(self, key))
        for key in ("type", "source"):
            self._template(key, getattr(self, key))
        names = [e.name for e in self.emit]
        if len(set(names)) != len(names):
            raise ValueError(f"emit: names must be unique within a rule, got {names}")
        for e in self.emit:
            where = f"emit {e.name!r}: "
            self._known(where + "to", e.to)
            self._known(where + "exclude", e.exclude)
            for key in TEMPLATE_KEYS:
                self._template(where + key, getattr(e, key))
            for key in ("severity", "batch_key"):
                value = getattr(e, key)
                if isinstance(value, Lookup):
                    self._known(f"{where}{key}.field", value.field)
                elif key == "batch_key":
                    self._template(where + key, value)
        return self

    def _known(self, where: str, name: str | None) -> None:
        if name is not None and name not in self.fields:
            raise ValueError(f"{where}: names field {name!r}, which [rule.fields] does not define")

    def _template(self, where: str, text: str | None) -> None:
        if text is None:
            return
        t = Template(text)
        if not t.is_valid():
            raise ValueError(f"{where}: invalid template {text!r} (write ${{name}}, and $$ for a dollar)")
        for ident in t.get_identifiers():
            if ident not in self.fields:
                raise ValueError(f"{where}: template names ${{{ident}}}, which [rule.fields] does not define")


class RulesFile(_Strict):
    rule: list[Rule] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> RulesFile:
        names = [r.name for r in self.rule]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(dupes)}")
        return self


# --- applying rules ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """What a rule sees of one record."""

    value: bytes
    doc: Any  # the JSON the paths read: the value, or a CloudEvent's data
    headers: Mapping[str, str]  # lower-cased names
    topic: str
    event: CloudEvent | None = None

    @property
    def type(self) -> Any:
        if self.event is not None:
            return self.event.type
        return self.doc.get("type") if isinstance(self.doc, dict) else None

    @property
    def source(self) -> Any:
        if self.event is not None:
            return self.event.source
        return self.doc.get("source") if isinstance(self.doc, dict) else None


@dataclass
class Mapped:
    """A rule's output: envelope fields per notification, before validation."""

    rule: str
    envelopes: list[dict[str, Any]] = field(default_factory=list)
    content_keyed: bool = False


def _matches(value: Any, patterns: Patterns) -> bool:
    if value is None or value is MISSING or isinstance(value, dict | list):
        return False
    text = _text(value)
    pats = [patterns] if isinstance(patterns, str) else patterns
    return any(fnmatchcase(text, p) for p in pats)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


class CompiledRule:
    """A validated rule with its paths and templates parsed once."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.name = rule.name
        m = rule.match
        self._field_matches = [(compile_path(p), pats) for p, pats in m.fields.items()]
        self._header_matches = [(h.lower(), pats) for h, pats in m.headers.items()]
        self._paths = {
            n: compile_path(f.path)
            for n, f in rule.fields.items()
            if not f.path.startswith(("header:", "ce:"))
        }
        self._regex = {n: re.compile(f.findall) for n, f in rule.fields.items() if f.findall}
        self._templates: dict[tuple[str, str], Template] = {}
        for key in ("type", "source"):
            text = getattr(rule, key)
            if text is not None:
                self._templates[("", key)] = Template(text)
        for e in rule.emit:
            for key in (*TEMPLATE_KEYS, "batch_key"):
                text = getattr(e, key)
                if isinstance(text, str):
                    self._templates[(e.name, key)] = Template(text)

    def matches(self, rec: Record) -> bool:
        m = self.rule.match
        if m.topic is not None and not _matches(rec.topic, m.topic):
            return False
        for name, pats in self._header_matches:
            if not _matches(rec.headers.get(name), pats):
                return False
        if m.type is not None and not _matches(rec.type, m.type):
            return False
        if m.source is not None and not _matches(rec.source, m.source):
            return False
        return all(_matches(resolve(rec.doc, p), pats) for p, pats in self._field_matches)

    def apply(self, rec: Record) -> Mapped:
        """Envelope fields for each emit; ``MappingFailed`` or ``NoRecipients`` when it cannot."""
        values = _Values(self, rec)
        r = self.rule
        event_id = values.optional(r.id) if r.id else None
        if event_id is None and rec.event is not None:
            event_id = rec.event.id
        occurred = values.optional(r.occurred_at) if r.occurred_at else None
        if occurred is None and rec.event is not None:
            occurred = rec.event.time
        out = Mapped(self.name)
        many = len(r.emit) > 1
        for e in r.emit:
            env = self._emit(e, rec, values, occurred)
            if env is None:
                continue
            suffix = f":{e.name}" if many else ""
            if event_id is not None:
                env["id"] = f"{_text(event_id)}{suffix}"
            else:
                env["id"] = content_key(rec.value) + suffix
                if "idempotency_key" not in env and "resource_id" not in env:
                    env["idempotency_key"] = env["id"]
                    out.content_keyed = True
            out.envelopes.append(env)
        if not out.envelopes:
            raise NoRecipients(f"rule {self.name!r}: every emit had an empty recipient list")
        return out

    def _emit(self, e: Emit, rec: Record, values: _Values, occurred: Any) -> dict[str, Any] | None:
        env: dict[str, Any] = {"title": values.render(e.name, "title"), "sensitive": e.sensitive}
        audience = values.get(e.name, e.to) if e.to else None
        if audience is None and rec.event is not None and rec.event.subject is not None:
            audience = rec.event.subject
        if audience is None:
            raise MappingFailed(f"rule {self.name!r}, emit {e.name!r}: no recipient (set to = <field>)")
        users = audience if isinstance(audience, list) else [audience]
        excluded = _excluded(values.get(e.name, e.exclude)) if e.exclude else set()
        recipients = [u for u in dict.fromkeys(_text(a) for a in users) if u not in excluded]
        if not recipients:
            return None
        if isinstance(audience, list):
            env["recipients"] = recipients
        else:
            env["user_id"] = recipients[0]
        env["type"] = self._first(values, (e.name, "type"), ("", "type")) or self._default_type(rec, e)
        source = self._first(values, (e.name, "source"), ("", "source"))
        if source is None and rec.event is not None:
            source = rec.event.source
        if source is not None:
            env["source"] = source
        for key in ("summary", "body", "category", "target_url", "resource_id", "idempotency_key"):
            text = values.render(e.name, key)
            if text:  # an empty optional value is no value
                env[key] = text
        env["severity"] = values.lookup(e.name, "severity", e.severity)
        batch = values.lookup(e.name, "batch_key", e.batch_key) if e.batch_key is not None else None
        if batch:
            env["batch_key"] = batch
        if occurred is not None:
            env["occurred_at"] = occurred
        env["data"] = {"rule": self.name, "emit": e.name}
        return env

    def _first(self, values: _Values, *keys: tuple[str, str]) -> str | None:
        for key in keys:
            if key in self._templates:
                return values.render(*key)
        return None

    def _default_type(self, rec: Record, e: Emit) -> str:
        if isinstance(rec.type, str) and rec.type:
            return rec.type
        raise MappingFailed(f"rule {self.name!r}, emit {e.name!r}: no type (set type = ... in the rule)")

    def field_value(self, name: str, rec: Record) -> Any:
        spec = self.rule.fields[name]
        path = spec.path
        if path.startswith("header:"):
            value: Any = rec.headers.get(path[len("header:") :].lower(), MISSING)
        elif path.startswith("ce:"):
            value = getattr(rec.event, path[3:], None) if rec.event is not None else None
            value = MISSING if value is None else value
        else:
            value = resolve(rec.doc, self._paths[name])
        if value is not MISSING and name in self._regex:
            found = self._regex[name].findall(_text(value))
            value = list(dict.fromkeys(found))
        if value is MISSING and spec.default is not None:
            value = spec.default
        return value

    def template(self, emit: str, key: str) -> Template | None:
        return self._templates.get((emit, key))


def _excluded(value: Any) -> set[str]:
    if value is None:
        return set()
    return {_text(v) for v in value} if isinstance(value, list) else {_text(value)}


class _Values:
    """Field values of one record, read on first use."""

    def __init__(self, rule: CompiledRule, rec: Record) -> None:
        self._rule = rule
        self._rec = rec
        self._cache: dict[str, Any] = {}

    def optional(self, name: str) -> Any:
        if name not in self._cache:
            self._cache[name] = self._rule.field_value(name, self._rec)
        value = self._cache[name]
        return None if value is MISSING else value

    def get(self, emit: str, name: str) -> Any:
        value = self.optional(name)
        if value is None:
            path = self._rule.rule.fields[name].path
            raise MappingFailed(
                f"rule {self._rule.name!r}, emit {emit!r}: field {name!r} ({path}) is missing from the event"
            )
        return value

    def render(self, emit: str, key: str) -> str | None:
        t = self._rule.template(emit, key)
        if t is None:
            return None
        return t.substitute({ident: _text(self.get(emit, ident)) for ident in t.get_identifiers()})

    def lookup(self, emit: str, key: str, spec: str | Lookup) -> str:
        if isinstance(spec, str):
            return (self.render(emit, key) or "") if key == "batch_key" else spec
        value = self.optional(spec.field)
        if value is not None and _text(value) in spec.map:
            return spec.map[_text(value)]
        if spec.default is not None:
            return spec.default
        raise MappingFailed(
            f"rule {self._rule.name!r}, emit {emit!r}: {key}: field {spec.field!r} "
            f"is {'missing' if value is None else repr(_text(value))}, not in the lookup and no default"
        )


class RuleSet:
    """The rules of one file, in order; the first that matches a record maps it."""

    def __init__(self, rules: list[Rule], origin: str = "<rules>") -> None:
        self.origin = origin
        self.rules = [CompiledRule(r) for r in rules]

    def __len__(self) -> int:
        return len(self.rules)

    def match(self, rec: Record) -> CompiledRule | None:
        for rule in self.rules:
            if rule.matches(rec):
                return rule
        return None

    @classmethod
    def load(cls, path: str | Path) -> RuleSet:
        """Read and validate a rules file (or every rules file in a folder, in name order).

        TOML (``*.toml``) or YAML (``*.yaml``, ``*.yml``): the same structure either way.

        ``ConfigError`` names the file, the rule and the field.
        """
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in _SUFFIXES)
            if not files:
                raise ConfigError(f"rules folder {p}: no *.toml, *.yaml or *.yml files in it")
            rules = [r for f in files for r in cls._load_file(f).rules]
            names = [r.name for r in rules]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ConfigError(
                    f"rules folder {p}: rule names must be unique; repeated: {', '.join(dupes)}"
                )
            out = cls([], str(p))
            out.rules = rules
            return out
        return cls._load_file(p)

    @classmethod
    def _load_file(cls, p: Path) -> RuleSet:
        yaml_file = p.suffix in (".yaml", ".yml")
        try:
            text = p.read_text(encoding="utf-8")
            data = yaml.safe_load(text) if yaml_file else tomllib.loads(text)
        except OSError as exc:
            raise ConfigError(f"rules file {p}: cannot read it: {exc.strerror or exc}") from exc
        except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"rules file {p}: not valid {'YAML' if yaml_file else 'TOML'}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"rules file {p}: expected a mapping with a 'rule' list at the top")
        return cls.from_data(data, str(p))

    @classmethod
    def from_data(cls, data: dict[str, Any], origin: str = "<rules>") -> RuleSet:
        try:
            parsed = RulesFile.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"rules file {origin}: {describe(exc, data)}") from None
        return cls(parsed.rule, origin)


def describe(exc: ValidationError, data: Any) -> str:
    """Pydantic's errors, with each rule named by its ``name`` rather than its index."""
    raw = data.get("rule") if isinstance(data, dict) else None
    lines = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        loc = list(err["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] == "rule" and isinstance(loc[1], int):
            i = loc[1]
            name = raw[i].get("name") if isinstance(raw, list) and isinstance(raw[i], dict) else None
            where = f"rule {name!r}" if name else f"rule #{i + 1} (no name)"
            loc = loc[2:]
        loc = [p for p in loc if p not in ("str", "Lookup", "literal['info','success','warning','critical']")]
        path = ".".join(str(p) for p in loc)
        msg = str(err["msg"]).removeprefix("Value error, ")
        lines.append(": ".join(s for s in (where, path, msg) if s))
    return "; ".join(lines)
