"""``herald ingest``: events in, notifications stored once, deliveries published.

For each batch, in this order:

1. validate every record; malformed ones become dead-letter records;
2. expand recipients, derive idempotency keys, drop in-batch duplicates
   (steps 1-2 are ``prepare``: CPU only, overlapping the previous batch's I/O);
3. in ONE PostgreSQL transaction: read preferences, insert the new notifications
   (dedupe on ``(user_id, idempotency_key)``), count rate limits, insert one
   delivery row per (notification, channel) decision, and read back the
   unpublished delivery rows of notifications seen before (the outbox);
4. publish deliveries, digest entries and dead letters, and wait for the acks;
5. mark those delivery rows published (outbox drained);
6. (the loop) commit the offsets.

A crash after 3 and before 6 reprocesses the batch: the notifications are
duplicates then, but their delivery rows are still unpublished, so step 3 finds
them and step 4 publishes them. Duplicated publishes are harmless: delivery ids
are deterministic and channel consumers never send one twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from config.settings import Settings
from consumers import outbox
from consumers.decode import Decoder
from consumers.dlq import count_dead_letters, dead_letter
from core import metrics, policy
from core.envelope import BYTE_LIMITS, Notification, expand_all
from core.errors import InvalidEvent, RecordRejected
from core.policy import Decision, Preferences
from producers.publisher import OutRecord, Publisher
from producers.topics import Topics
from storage import notifications as store
from storage import stream
from storage.db import Database

log = logging.getLogger(__name__)

# Set by the receiver (and by any producer that wants a stable source name per sender).
SOURCE_HEADER = "herald-source"


@dataclass
class BatchOutcome:
    """What one batch did, for metrics, logs and tests."""

    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    invalid: int = 0
    hidden: int = 0
    rate_limited: int = 0
    immediate: int = 0
    digest: int = 0
    republished: int = 0
    content_keys: int = 0
    by_channel: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """A validated batch, ready for its transaction."""

    notes: list[Notification]
    dead: list[OutRecord]
    origin: dict[uuid.UUID, Message]
    outcome: BatchOutcome


class IngestHandler:
    """The batch handler for ``herald.events``; see the module docstring for the order."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        publisher: Publisher,
        topics: Topics,
        decoder: Decoder | None = None,
        on_commit: Callable[[Prepared, float], None] | None = None,
    ) -> None:
        self._settings = settings
        # Called with each batch and the wall-clock time its transaction committed
        # (``herald bench ingest --rate`` measures record time to commit with it).
        self._on_commit = on_commit
        # Native and CloudEvents only, unless the composition root passes one with rules.
        self._decode = decoder or Decoder(max_bytes=settings.max_event_bytes)
        self._policy = settings.policy
        self._db = db
        self._publisher = publisher
        self._topics = topics
        self._defaults = Preferences.defaults(settings.policy)
        self.totals = BatchOutcome()
        self._metrics = metrics.ingest()

    def __call__(self, messages: Sequence[Message]) -> None:
        self.apply(self.prepare(messages))

    def prepare(self, messages: Sequence[Message]) -> Prepared:
        """Steps 1 and 2: CPU only, so it can run while the previous batch is applied."""
        outcome = BatchOutcome(records=len(messages))
        notes, dead, origin = self._validate(messages, outcome)
        return Prepared(notes, dead, origin, outcome)

    def apply(self, prepared: Prepared) -> None:
        """Steps 3 to 5; safe to call again with the same batch after a retryable failure."""
        notes, origin = prepared.notes, prepared.origin
        outcome = replace(prepared.outcome, by_channel={})
        dead = list(prepared.dead)
        try:
            decisions, stale = self._store(notes, outcome)
        except RecordRejected as exc:
            # PostgreSQL refused a record that passed validation: find it by halving the
            # batch, dead-letter it, store its batch mates, and keep the partition moving.
            log.warning(
                "batch of %d notifications refused (%s); bisecting to find the record", len(notes), exc
            )
            decisions, stale = self._bisect(notes, origin, outcome, dead)
        if self._on_commit is not None:
            self._on_commit(prepared, time.time())
        out = [self._record(d, origin) for d in decisions]
        out += [outbox.stored_record(s, self._topics, self._settings) for s in stale]
        self._publisher.publish(out + dead)
        published = [d.delivery_id for d in decisions] + [s.id for s in stale]
        if published:
            with self._db.transaction() as cur:
                store.mark_published(cur, published)
        outcome.republished = len(stale)
        self._account(outcome, dead)

    # step 1 and 2
    def _validate(
        self, messages: Sequence[Message], outcome: BatchOutcome
    ) -> tuple[list[Notification], list[OutRecord], dict[uuid.UUID, Message]]:
        notes: dict[tuple[str, str], Notification] = {}
        origin: dict[uuid.UUID, Message] = {}
        dead: list[OutRecord] = []
        for msg in messages:
            try:
                decoded = self._decode(msg.value(), msg.headers(), msg.topic() or "")
            except InvalidEvent as exc:
                # One line per record at DEBUG; the batch's summary at INFO (below): a flood
                # of bad records must not become a flood of log lines (it cost ingest 9% of
                # its CPU in a chaos run with 9% malformed records).
                log.debug(
                    "%s[%d]@%d: invalid event (%s) -> dead-letter topic",
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    exc.reason,
                    extra=_where(msg, "dlq"),
                )
                dead.append(dead_letter(msg, self._topics.events_dlq, exc, exc.reason))
                continue
            kind, ts = msg.timestamp()
            record_time = None if kind == TIMESTAMP_NOT_AVAILABLE else datetime.fromtimestamp(ts / 1000, UTC)
            outcome.content_keys += decoded.content_keyed
            source = self._default_source(msg)
            for n in expand_all(
                decoded.envelopes,
                policy=self._policy,
                default_source=source,
                record_time=record_time,
                content_keyed=decoded.content_keyed,
            ):
                key = (n.user_id, n.idempotency_key)
                if key in notes:
                    outcome.duplicates += 1
                else:
                    notes[key] = n
                    origin[n.id] = msg
        outcome.invalid = len(dead)
        if dead:
            reasons = Counter(d.reason for d in dead)
            log.info(
                "%d invalid event(s) -> dead-letter topic (%s)",
                len(dead),
                ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items(), key=lambda rn: str(rn[0]))),
            )  # no record's context: each record's own line (DEBUG) carries it
        return list(notes.values()), dead, origin

    def _default_source(self, msg: Message) -> str:
        """The ``herald-source`` header (the receiver sets it), else the configured stable name."""
        raw = msg.headers() or []
        for name, value in raw.items() if isinstance(raw, dict) else raw:
            if name != SOURCE_HEADER:
                continue
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")
            if 0 < len(text.encode()) <= BYTE_LIMITS["source"] and text.isprintable():
                return text
        return self._settings.default_source

    def _bisect(
        self,
        notes: list[Notification],
        origin: dict[uuid.UUID, Message],
        outcome: BatchOutcome,
        dead: list[OutRecord],
    ) -> tuple[list[Decision], list[store.UnpublishedDelivery]]:
        """Store the batch in halves until each refused source record stands alone.

        About 2·log2(n) transactions per refused record, not one per record. The
        notifications of one source record stay together: a record lands whole or is
        dead-lettered whole. Halves that commit before a retryable failure are simply
        duplicates when the loop retries the batch.
        """
        groups: dict[int, list[Notification]] = {}
        for n in notes:
            groups.setdefault(id(origin[n.id]), []).append(n)
        decisions: list[Decision] = []
        stale: list[store.UnpublishedDelivery] = []
        pending: list[list[list[Notification]]] = [list(groups.values())]
        while pending:
            part = pending.pop()
            try:
                d, s = self._store([n for g in part for n in g], outcome)
            except RecordRejected as exc:
                if len(part) > 1:
                    mid = len(part) // 2
                    pending += [part[mid:], part[:mid]]  # the first half is tried first
                    continue
                msg = origin[part[0][0].id]
                log.warning(
                    "%s[%d]@%d: refused by PostgreSQL -> dead-letter topic",
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    extra=_where(msg, "dlq"),
                )
                dead.append(dead_letter(msg, self._topics.events_dlq, exc, "rejected"))
                outcome.invalid += 1
                continue
            decisions += d
            stale += s
        return decisions, stale

    # step 3
    def _store(
        self, notes: list[Notification], outcome: BatchOutcome
    ) -> tuple[list[Decision], list[store.UnpublishedDelivery]]:
        if not notes:
            return [], []
        users = sorted({n.user_id for n in notes})
        with self._db.transaction() as cur:
            stored = store.load_preferences(cur, users)
            prefs = {u: self._defaults.merged(stored[u]) if u in stored else self._defaults for u in users}
            hidden = [prefs[n.user_id].hidden(n.category) for n in notes]
            inserted = store.insert_notifications(cur, notes, hidden)
            new = [n for n in notes if n.id in inserted]
            # Open streams of these users wake once this commits (storage/stream.py).
            stream.notify_users(
                cur,
                sorted({n.user_id for n, h in zip(notes, hidden, strict=True) if not h and n.id in inserted}),
            )
            planned = [d for n in new for d in policy.plan(n, prefs[n.user_id])]
            counts = store.add_rate_counts(cur, policy.requested(planned))
            decisions = policy.apply_rate_limits(planned, counts, self._policy)
            store.insert_deliveries(cur, decisions)
            seen_before = [n.id for n in notes if n.id not in inserted]
            stale = store.unpublished_for(cur, seen_before)
        outcome.inserted += len(new)
        outcome.duplicates += len(notes) - len(new)
        outcome.hidden += sum(1 for n, h in zip(notes, hidden, strict=True) if h and n.id in inserted)
        for d in decisions:
            if d.reason == policy.REASON_RATE_LIMITED:
                outcome.rate_limited += 1
            if d.route == policy.IMMEDIATE:
                outcome.immediate += 1
                outcome.by_channel[d.channel] = outcome.by_channel.get(d.channel, 0) + 1
            else:
                outcome.digest += 1
        return decisions, stale

    # step 4: records that leave the system (already redacted)
    def _record(self, d: Decision, origin: dict[uuid.UUID, Message]) -> OutRecord:
        payload = policy.decision_record(d, self._policy)
        msg = origin.get(d.notification.id)
        kind, ts = msg.timestamp() if msg is not None else (TIMESTAMP_NOT_AVAILABLE, 0)
        event_ms = ts if kind != TIMESTAMP_NOT_AVAILABLE else None
        return outbox.encode(self._topics, d.route, d.channel, d.notification.user_id, payload, event_ms)

    def _account(self, o: BatchOutcome, dead: list[OutRecord]) -> None:
        mx = self._metrics
        m = mx.events
        m.labels("inserted").inc(o.inserted)
        m.labels("duplicate").inc(o.duplicates)
        m.labels("invalid").inc(o.invalid)
        m.labels("rate_limited").inc(o.rate_limited)
        m.labels("hidden").inc(o.hidden)
        if o.content_keys:
            mx.content_keys.inc(o.content_keys)
        count_dead_letters("ingest", dead)
        for channel, n in o.by_channel.items():
            mx.records_published.labels("delivery", channel).inc(n)
        mx.records_published.labels("digest", "").inc(o.digest)
        t = self.totals
        for name in (
            "records",
            "inserted",
            "duplicates",
            "invalid",
            "hidden",
            "rate_limited",
            "immediate",
            "digest",
            "republished",
            "content_keys",
        ):
            setattr(t, name, getattr(t, name) + getattr(o, name))
        for channel, n in o.by_channel.items():
            t.by_channel[channel] = t.by_channel.get(channel, 0) + n
        log.debug(
            "batch: %d records, %d new, %d duplicate, %d invalid",
            o.records,
            o.inserted,
            o.duplicates,
            o.invalid,
        )


def _where(msg: Message, outcome: str) -> dict[str, object]:
    """Structured log context for a line about one record (never its value)."""
    return {
        "consumer": "ingest",
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "outcome": outcome,
    }
