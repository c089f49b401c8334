"""Dead-letter topics for operators: what is there (``herald dlq``), and moving it back
(``herald redrive``).

A redrive moves each chosen dead letter to its main topic: the events topic for an event,
the channel's main topic for a delivery (a retry topic's dead letter goes to the main
topic too). It strips the dead-letter and retry headers and adds ``herald-redriven-from``
(``<dlq>:<partition>:<offset>``). For a delivery it first puts the row back from
``failed`` to ``queued``, keeping its attempt history, restarting its attempt budget,
and stamping the record with the row's attempt count so the channel consumer claims it
afresh; a delivery already ``sent`` is recorded and never produced again.

Order per chunk, and why a record never moves twice (storage/redrives.py):

1. take: the records become ``pending`` rows in PostgreSQL (and failed rows ``queued``),
   in one transaction;
2. produce them and wait for the broker's acknowledgement;
3. mark the rows ``moved``.

A crash between 1 and 3 leaves ``pending`` rows. The next redrive first looks for each
one on its target topic, from shortly before it was taken, by its ``herald-redriven-from``
header: found, it is marked ``moved``; not found, it is produced then. The one window left
is a record still in flight inside a dying producer that the broker appends after that
look; the consumers' dedupe (notification ids, the delivery row's stage) makes even that
copy harmless.
"""

from __future__ import annotations

import json
import logging
import struct
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from config.settings import Settings
from consumers.deliver import H_ATTEMPTS, H_DELIVERY_ID, RETRY_HEADERS
from consumers.dlq import DLT_HEADERS, H_REASON, H_TOPIC, decode_headers
from consumers.offsets import Kafka, first_at_or_after
from consumers.reading import Record, read_topic
from core.errors import HeraldError
from producers.publisher import H_VALUE_DROPPED, Headers, KafkaPublisher, OutRecord
from producers.topics import Topics
from storage import redrives as store
from storage.db import Database

log = logging.getLogger(__name__)

H_FROM = "herald-redriven-from"
# Look this far before a pending row was taken when searching its target topic (clock skew).
SEARCH_SLACK_MS = 60_000
FILTER_KEYS = ("reason", "topic")


# -- reading a DLQ -------------------------------------------------------------------------


def reason_of(rec: Record) -> str:
    return rec.headers.get(H_REASON, b"").decode(errors="replace") or "unknown"


def original_topic(rec: Record) -> str:
    return rec.headers.get(H_TOPIC, b"").decode(errors="replace")


def value_dropped(rec: Record) -> bool:
    return rec.headers.get(H_VALUE_DROPPED, b"").lower() == b"true"


@dataclass
class Summary:
    topic: str
    total: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    origins: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    oldest: Record | None = None
    newest: Record | None = None


def summarize(topic: str, records: Sequence[Record]) -> Summary:
    s = Summary(topic, len(records))
    for rec in records:
        s.reasons[reason_of(rec)] += 1
        s.origins[original_topic(rec) or "unknown"] += 1
        s.dropped += value_dropped(rec)
        if s.oldest is None or rec.timestamp_ms < s.oldest.timestamp_ms:
            s.oldest = rec
        if s.newest is None or rec.timestamp_ms >= s.newest.timestamp_ms:
            s.newest = rec
    return s


def decoded_headers(headers: Mapping[str, bytes]) -> dict[str, object]:
    """Every header readable: the dead-letter ones by their types (DESIGN.md), the retry
    count as its 4-byte int, the rest as UTF-8 (or hex when not text)."""
    dlt = decode_headers(headers)
    out: dict[str, object] = {}
    for name, raw in headers.items():
        if name in dlt:
            out[name] = dlt[name]
        elif name == H_ATTEMPTS and len(raw) == 4:
            out[name] = struct.unpack(">i", raw)[0]
        else:
            try:
                out[name] = raw.decode()
            except UnicodeDecodeError:
                out[name] = "0x" + raw.hex()
    return out


def parse_where(clauses: Sequence[str]) -> dict[str, str]:
    """``reason=permanent``, ``topic=herald.events``: ValueError names what is accepted."""
    out: dict[str, str] = {}
    for clause in clauses:
        key, sep, value = clause.partition("=")
        if not sep or key not in FILTER_KEYS or not value:
            raise ValueError(f"--where {clause!r}: give reason=X or topic=X (the original topic)")
        out[key] = value
    return out


def matches(rec: Record, where: Mapping[str, str]) -> bool:
    if "reason" in where and reason_of(rec) != where["reason"]:
        return False
    return not ("topic" in where and original_topic(rec) != where["topic"])


# -- redrive -------------------------------------------------------------------------------


def target_of(topics: Topics, original: str) -> str:
    """Where a dead letter goes back to: its original topic, or for a retry topic's dead
    letter, its channel's main topic."""
    head, sep, _ = original.rpartition(".retry.")
    if sep and head.startswith(f"{topics.prefix}.deliveries."):
        return head
    return original


def delivery_id_of(rec: Record) -> uuid.UUID | None:
    raw = rec.headers.get(H_DELIVERY_ID)
    try:
        if raw:
            return uuid.UUID(raw.decode())
        payload = json.loads(rec.value or b"")
        return uuid.UUID(str(payload["delivery_id"])) if isinstance(payload, dict) else None
    except (ValueError, KeyError, UnicodeDecodeError):
        return None


def tag(dlq: str, rec_partition: int, rec_offset: int) -> bytes:
    return f"{dlq}:{rec_partition}:{rec_offset}".encode()


def moved_record(rec: Record, target: str, attempts: int | None) -> OutRecord:
    """The dead letter as its main topic expects it: original key, value and headers;
    no dead-letter or retry headers; the delivery row's attempt count when it has one."""
    strip = DLT_HEADERS | RETRY_HEADERS | {H_FROM}
    headers: Headers = [(k, v) for k, v in rec.headers.items() if k not in strip]
    if attempts:
        headers.append((H_ATTEMPTS, struct.pack(">i", attempts)))
    headers.append((H_FROM, tag(rec.topic, rec.partition, rec.offset)))
    return OutRecord(topic=target, value=rec.value, key=rec.key, headers=headers)


@dataclass(frozen=True, slots=True)
class Line:
    """One dead letter in the report: what happened to it, and why."""

    partition: int
    offset: int
    reason: str
    target: str
    outcome: str  # moved, already_sent, value_dropped, found (a crashed run had moved it), would_move
    delivery_id: uuid.UUID | None = None


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)
    done_before: int = 0  # records earlier redrives took
    filtered: int = 0  # records the filter left (still available)

    def count(self, outcome: str) -> int:
        return sum(1 for line in self.lines if line.outcome == outcome)


Progress = Callable[[int], None]


class RedriveBusy(HeraldError):
    """Another redrive of the same DLQ holds its lock."""


class Redrive:
    """One ``herald redrive --dlq TOPIC`` run (see the module docstring for its order)."""

    def __init__(self, settings: Settings, db: Database, dlq: str, *, chunk: int = 200) -> None:
        self.settings = settings
        self.db = db
        self.dlq = dlq
        self.chunk = chunk
        self.topics = Topics(settings.topic_prefix)

    def plan(self, where: Mapping[str, str], limit: int | None) -> tuple[list[Record], Report]:
        """The records this run would move, and the report of what it leaves (nothing changes)."""
        records = read_topic(self.settings, self.dlq, timeout=30)
        with self.db.transaction() as cur:
            done = store.done(cur, self.dlq)
        report = Report(done_before=len(done))
        chosen: list[Record] = []
        for rec in sorted(records, key=lambda r: (r.timestamp_ms, r.partition, r.offset)):
            if (rec.partition, rec.offset) in done:
                continue
            if not matches(rec, where):
                report.filtered += 1
                continue
            target = target_of(self.topics, original_topic(rec))
            if value_dropped(rec) or not target:
                report.lines.append(Line(rec.partition, rec.offset, reason_of(rec), target, "value_dropped"))
                continue
            if limit is not None and len(chosen) >= limit:
                report.filtered += 1
                continue
            chosen.append(rec)
        return chosen, report

    def lock(self) -> None:
        """One redrive of a DLQ at a time: a second one would take the first's pending rows
        for a crashed run's and produce them again."""
        with self.db.transaction() as cur:
            if not store.lock(cur, self.dlq):
                raise RedriveBusy(f"another herald redrive of {self.dlq} is running; wait for it to finish")

    def preview(self, records: Sequence[Record]) -> list[Line]:
        """What ``run`` would do with ``records`` (a dry run)."""
        return [
            Line(r.partition, r.offset, reason_of(r), target_of(self.topics, original_topic(r)), "would move")
            for r in records
        ]

    def recover(self, progress: Progress | None = None) -> list[Line]:
        """Finish what a crashed run left ``pending``: mark found records moved, produce the rest."""
        with self.db.transaction() as cur:
            done = store.done(cur, self.dlq)
        pending = {pos: d for pos, d in done.items() if d.status == "pending"}
        if not pending:
            return []
        found = self._find_on_targets(pending)
        lines = [Line(p, o, "", pending[(p, o)].target_topic, "found") for p, o in sorted(found)]
        with self.db.transaction() as cur:
            store.mark(cur, self.dlq, sorted(found))
        missing = {pos: d for pos, d in pending.items() if pos not in found}
        if missing:
            by_pos = {(r.partition, r.offset): r for r in read_topic(self.settings, self.dlq, timeout=30)}
            recs = [by_pos[pos] for pos in sorted(missing) if pos in by_pos]
            lines += self._produce(recs, taken=True, progress=progress)
        return lines

    def _find_on_targets(self, pending: Mapping[tuple[int, int], store.Done]) -> set[tuple[int, int]]:
        wanted = {tag(self.dlq, p, o): (p, o) for p, o in pending}
        found: set[tuple[int, int]] = set()
        by_target: dict[str, int] = {}
        for d in pending.values():
            by_target[d.target_topic] = min(by_target.get(d.target_topic, d.taken_at_ms), d.taken_at_ms)
        for target, since_ms in by_target.items():
            with Kafka(self.settings) as k:
                start = {
                    p: first_at_or_after(k, target, p, since_ms - SEARCH_SLACK_MS)
                    for p in k.partitions(target)
                }
            for rec in read_topic(self.settings, target, timeout=30, start=start):
                pos = wanted.get(rec.headers.get(H_FROM, b""))
                if pos is not None:
                    found.add(pos)
        return found

    def run(self, records: Sequence[Record], progress: Progress | None = None) -> list[Line]:
        return self._produce(records, taken=False, progress=progress)

    def _produce(self, records: Sequence[Record], *, taken: bool, progress: Progress | None) -> list[Line]:
        lines: list[Line] = []
        publisher = KafkaPublisher(self.settings)
        try:
            for i in range(0, len(records), self.chunk):
                lines += self._chunk(publisher, records[i : i + self.chunk], taken)
                if progress is not None:
                    progress(len(records[i : i + self.chunk]))
        finally:
            publisher.close()
        return lines

    def _chunk(self, publisher: KafkaPublisher, records: Sequence[Record], taken: bool) -> list[Line]:
        """Steps 1 to 3 for one chunk (step 1 already done when ``taken``: a crashed run's)."""
        ids = {(r.partition, r.offset): delivery_id_of(r) for r in records if self._is_delivery_dlq()}
        with self.db.transaction() as cur:
            states = store.delivery_states(cur, [i for i in ids.values() if i])
            rows: list[store.Taken] = []
            for rec in records:
                did = ids.get((rec.partition, rec.offset))
                sent = did is not None and states.get(did, ("", 0))[0] == "sent"
                target = target_of(self.topics, original_topic(rec))
                status = "already_sent" if sent else "pending"
                rows.append(store.Taken(rec.partition, rec.offset, target, reason_of(rec), did, status))
            mine = {(r.partition, r.offset) for r in rows} if taken else store.take(cur, self.dlq, rows)
            # Attempts after the reset: the record's claim must match the row's stage.
            states = store.delivery_states(cur, [i for i in ids.values() if i])
        out: list[OutRecord] = []
        lines: list[Line] = []
        for rec, row in zip(records, rows, strict=True):
            if (rec.partition, rec.offset) not in mine:
                continue  # another redrive took it first
            if row.status == "already_sent":
                lines.append(
                    Line(
                        rec.partition,
                        rec.offset,
                        row.reason or "",
                        row.target_topic,
                        "already_sent",
                        row.delivery_id,
                    )
                )
                continue
            attempts = states.get(row.delivery_id, ("", 0))[1] if row.delivery_id else None
            out.append(moved_record(rec, row.target_topic, attempts))
            lines.append(
                Line(rec.partition, rec.offset, row.reason or "", row.target_topic, "moved", row.delivery_id)
            )
        if out:
            publisher.publish(out)
        with self.db.transaction() as cur:
            for outcome in ("moved", "already_sent"):
                store.mark(
                    cur,
                    self.dlq,
                    [(ln.partition, ln.offset) for ln in lines if ln.outcome == outcome],
                    outcome,
                )
        return lines

    def _is_delivery_dlq(self) -> bool:
        return self.dlq.startswith(f"{self.topics.prefix}.deliveries.")
