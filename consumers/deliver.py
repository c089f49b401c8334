"""The channel consumer: delivery records in, sends out, every outcome recorded.

One consumer group per channel (``herald-deliver-<channel>``) reads the channel's main
topic and its retry topics on the shared batch loop. Per batch, in this order:

1. **Hold back** records not yet due (retry records carry their due time): the loop
   pauses only that partition until then.
2. **Look up and claim**, in one transaction for the batch: a record whose row is final
   (sent, failed, skipped, ...) or that is a stale copy of an earlier stage is skipped
   and counted; a row another consumer still holds (its lease is live) holds its
   partition back until the lease ends; the rest are claimed (``sending``, leased).
3. **Send**: each claimed delivery to each of its user's enabled endpoints that has not
   already taken it (or refused it for good). One delivery at a time per partition;
   partitions in parallel. A rebalance cancels sends in hand and gives their claims back.
4. **Route** what did not go through: transient failures to the next retry tier,
   permanent ones and exhausted retries to the channel's dead-letter topic; wait for the
   broker's acknowledgement.
5. **Record** attempts (one row per try and endpoint) and outcomes in one transaction,
   and disable endpoints that answered 410. Then the loop commits the offsets.

Step 4 comes before step 5: a crash between them leaves the row ``sending``; its record
comes again, waits for the lease, and is sent once more (the send-once window of
DESIGN.md's invariant 2, recognisable by the same ``webhook-id``). The other order
would leave a ``retrying`` row with no retry record: a lost delivery.

A retryable error (PostgreSQL or the broker away) retries the batch in hand from the step
that failed: what was sent is not sent again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Message

from channels.base import Endpoint, Provider, SendResult
from config.settings import Settings
from consumers.dlq import dead_letter
from consumers.loop import Deferral
from core import metrics
from core.errors import HeraldError
from producers.publisher import Headers, OutRecord, Publisher
from producers.topics import Topics
from storage import deliveries as store
from storage.db import Database

log = logging.getLogger(__name__)

# Spring Kafka's retry-topic header names (DESIGN.md): tries made so far, and when due.
H_ATTEMPTS = "retry_topic-attempts"
H_DUE = "retry_topic-backoff-timestamp"
H_DELIVERY_ID = "herald-delivery-id"
RETRY_HEADERS = frozenset({H_ATTEMPTS, H_DUE})

# A lost claim race (another consumer claimed between our look-up and our claim): look again soon.
RACE_RETRY_S = 1.0


class DeliveryFailed(HeraldError):
    """Why a delivery was dead-lettered (its class name goes in ``kafka_dlt-exception-fqcn``)."""


@dataclass
class Item:
    msg: Message
    topic: str
    partition: int
    offset: int
    payload: dict[str, Any] | None
    delivery_id: uuid.UUID | None
    attempts_before: int
    due_s: float
    problem: str | None = None  # unreadable record: dead-lettered as permanent

    @property
    def tp(self) -> tuple[str, int]:
        return (self.topic, self.partition)


@dataclass
class Work:
    """A claimed delivery: where it goes and what came back."""

    item: Item
    attempt: int
    targets: list[Endpoint]
    settled: dict[int, str]  # endpoint id -> outcome, from earlier tries
    results: dict[int, SendResult] = field(default_factory=dict)
    attempts: list[store.Attempt] = field(default_factory=list)
    cancelled: bool = False


@dataclass
class Batch:
    """The prepared batch; ``apply`` fills it stage by stage and resumes where it failed."""

    items: list[Item]
    deferrals: dict[tuple[str, int], Deferral] = field(default_factory=dict)
    work: list[Work] | None = None
    skipped: list[tuple[Item, str]] = field(default_factory=list)
    unreadable: list[Item] = field(default_factory=list)
    sent: bool = False
    finishes: list[store.Finish] = field(default_factory=list)
    released: list[tuple[uuid.UUID, int]] = field(default_factory=list)
    published: bool = False
    recorded: bool = False


@dataclass(frozen=True)
class Verdict:
    status: str  # retrying, sent, failed, skipped
    reason: str | None  # no_endpoint, permanent, exhausted, endpoint_gone
    error: str | None
    retry_after_s: float | None = None


def settle(work: Work, max_attempts: int) -> Verdict:
    """What a delivery's row becomes after this try, from every endpoint's latest outcome."""
    outcomes = dict(work.settled)
    outcomes.update({eid: r.outcome for eid, r in work.results.items()})
    errors = [r.error for r in work.results.values() if r.error]
    error = "; ".join(errors)[:1000] or None
    if not outcomes:
        return Verdict("skipped", "no_endpoint", None)
    transient = [r for r in work.results.values() if r.outcome == "transient"]
    if transient:
        if work.attempt < max_attempts:
            waits = [r.retry_after_s for r in transient if r.retry_after_s is not None]
            return Verdict("retrying", None, error, max(waits) if waits else None)
        return Verdict("failed", "exhausted", error)
    values = set(outcomes.values())
    if "permanent" in values:
        return Verdict("failed", "permanent", error or "refused by an endpoint on an earlier try")
    if "gone" in values:
        return Verdict("failed", "endpoint_gone", error or "the endpoint answered 410 Gone on an earlier try")
    return Verdict("sent", None, None)


def stage(item: Item, row: store.RowState | None) -> str:
    """Where a record stands against its row: ``claim`` it, wait for a live ``leased`` claim,
    ``missing`` row, the row's final status, or ``stale`` (a later stage exists)."""
    if row is None:
        return "missing"
    if row.status in store.FINAL:
        return row.status
    if row.status in ("queued", "retrying") and row.attempts == item.attempts_before:
        return "claim"
    if row.status == "sending" and row.attempts == item.attempts_before + 1:
        live = row.lease_until is not None and row.lease_until > row.now
        return "leased" if live else "claim"
    return "stale"


def pick_tier(tiers: Sequence[float], attempt: int, retry_after_s: float | None) -> int:
    """The tier after ``attempt`` tries: one tier per try, the last repeating; a longer
    ``Retry-After`` picks the first tier that waits at least that long (or the last)."""
    index = min(attempt - 1, len(tiers) - 1)
    if retry_after_s is not None:
        while index < len(tiers) - 1 and tiers[index] < retry_after_s:
            index += 1
    return index


def _header(msg: Message, name: str) -> bytes | None:
    for k, v in _pairs(msg):
        if k == name:
            return v if isinstance(v, bytes) else None
    return None


def parse(msg: Message) -> Item:
    topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
    raw_attempts = _header(msg, H_ATTEMPTS)
    raw_due = _header(msg, H_DUE)
    item = Item(msg, topic, partition, offset, None, None, 0, 0.0)
    try:
        item.attempts_before = struct.unpack(">i", raw_attempts)[0] if raw_attempts else 0
        item.due_s = int(raw_due.decode()) / 1000 if raw_due else 0.0
        payload = json.loads(msg.value() or b"")
        if not isinstance(payload, dict):
            raise ValueError("not a JSON object")
        item.delivery_id = uuid.UUID(str(payload["delivery_id"]))
        for name in ("notification_id", "user_id", "title", "severity", "occurred_at"):
            if name not in payload:
                raise ValueError(f"no {name}")
        item.payload = payload
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:
        item.problem = f"unreadable delivery record: {exc}"[:300]
    return item


class DeliverHandler:
    """The batch handler of ``herald deliver`` (see the module docstring for the steps)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        publisher: Publisher,
        provider: Provider,
        *,
        topics: Topics | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._publisher = publisher
        self._provider = provider
        self.channel = provider.channel
        self._topics = topics or Topics(settings.topic_prefix)
        self._tiers = settings.delivery.tier_seconds()
        self._metrics = metrics.deliver()
        self._aio: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Future[Any] | None = None
        self._interrupted = threading.Event()

    # -- the batch loop's interface ------------------------------------------------------

    def prepare(self, messages: Sequence[Message]) -> Batch:
        return Batch([parse(m) for m in messages])

    def apply(self, batch: Batch) -> list[Deferral]:
        if batch.work is None:
            self._interrupted.clear()
            self._plan(batch)
        if not batch.sent:
            self._send(batch)
        if not batch.published:
            self._route(batch)
        if not batch.recorded:
            self._record(batch)
        return list(batch.deferrals.values())

    def interrupt(self) -> None:
        """A rebalance: cancel the sends in hand (their claims are given back)."""
        self._interrupted.set()
        aio, task = self._aio, self._task
        if aio is not None and task is not None:
            aio.call_soon_threadsafe(task.cancel)

    def close(self) -> None:
        if self._aio is not None:
            self._aio.run_until_complete(self._provider.aclose())
            self._aio.close()
            self._aio = None

    # -- 1 and 2: hold back, look up, claim ---------------------------------------------

    def _defer(self, batch: Batch, item: Item, resume_at: float, why: str) -> None:
        """Leave ``item``'s partition from ``item`` on for later (the lowest such offset wins)."""
        held = batch.deferrals.get(item.tp)
        if held is None or item.offset < held.offset:
            batch.deferrals[item.tp] = Deferral(item.topic, item.partition, item.offset, resume_at)
            self._metrics.deferred.labels(self.channel, why).inc()

    def _plan(self, batch: Batch) -> None:
        now = time.time()
        live: list[Item] = []
        # The same stage of a delivery twice in one batch: the first copy speaks for both.
        seen: set[tuple[uuid.UUID, int]] = set()
        for item in batch.items:
            if item.tp in batch.deferrals:
                continue
            if item.due_s > now:
                self._defer(batch, item, item.due_s, "due")
            elif item.problem is not None or item.delivery_id is None:
                batch.unreadable.append(item)
            elif (item.delivery_id, item.attempts_before) in seen:
                batch.skipped.append((item, "duplicate"))
            else:
                seen.add((item.delivery_id, item.attempts_before))
                live.append(item)
        batch.work = []
        if not live:
            return
        with self._db.transaction() as cur:
            rows = store.states(cur, sorted({i.delivery_id for i in live if i.delivery_id}))
            to_claim: list[Item] = []
            for item in live:
                assert item.delivery_id is not None
                row = rows.get(item.delivery_id)
                verdict = stage(item, row)
                if verdict == "claim":
                    to_claim.append(item)
                elif verdict == "leased" and row is not None and row.lease_until is not None:
                    # Another consumer is sending it (or died doing so): wait for its lease.
                    wait = (row.lease_until - row.now).total_seconds()
                    self._defer(batch, item, time.time() + wait, "leased")
                elif verdict == "missing":
                    item.problem = "no delivery row for this record (purged, or written by another database)"
                    batch.unreadable.append(item)
                else:
                    batch.skipped.append((item, verdict))
            to_claim = [
                i for i in to_claim if i.tp not in batch.deferrals or i.offset < batch.deferrals[i.tp].offset
            ]
            claimed = store.claim(
                cur,
                [(i.delivery_id, i.attempts_before) for i in to_claim if i.delivery_id],
                self._settings.delivery.lease_s,
            )
            lost = [i for i in to_claim if i.delivery_id not in claimed]
            for item in lost:  # claimed by someone else since the look-up: look again soon
                self._defer(batch, item, time.time() + RACE_RETRY_S, "leased")
            mine = [i for i in to_claim if i.delivery_id in claimed]
            back = [i for i in mine if i.tp in batch.deferrals and i.offset >= batch.deferrals[i.tp].offset]
            store.release(cur, [(i.delivery_id, i.attempts_before) for i in back if i.delivery_id])
            mine = [i for i in mine if i not in back]
            users = sorted({str(i.payload["user_id"]) for i in mine if i.payload})
            found = store.endpoints(cur, users, self.channel)
            done = store.settled(cur, [i.delivery_id for i in mine if i.delivery_id])
        # Skips after a deferral in the same partition come again with it: not counted twice.
        batch.skipped = [(i, r) for i, r in batch.skipped if not _after_deferral(batch, i)]
        batch.unreadable = [i for i in batch.unreadable if not _after_deferral(batch, i)]
        for item in mine:
            assert item.payload is not None and item.delivery_id is not None
            settled = done.get(item.delivery_id, {})
            targets = [
                Endpoint(e.id, e.user_id, e.address, e.secret)
                for e in found.get(str(item.payload["user_id"]), [])
                if e.id not in settled
            ]
            batch.work.append(Work(item, item.attempts_before + 1, targets, settled))

    # -- 3: send -------------------------------------------------------------------------

    def _send(self, batch: Batch) -> None:
        work = [w for w in batch.work or [] if w.targets]
        if work:
            if self._aio is None:
                self._aio = asyncio.new_event_loop()
            self._aio.run_until_complete(self._send_all(work))
        cancelled = [w for w in work if w.cancelled]
        for w in cancelled:
            self._defer(batch, w.item, time.time(), "rebalance")
        batch.released = [
            (w.item.delivery_id, w.item.attempts_before) for w in cancelled if w.item.delivery_id
        ]
        batch.sent = True

    async def _send_all(self, work: list[Work]) -> None:
        lanes: dict[tuple[str, int], list[Work]] = {}
        for w in work:
            lanes.setdefault(w.item.tp, []).append(w)
        self._task = asyncio.ensure_future(asyncio.gather(*(self._lane(ws) for ws in lanes.values())))
        if self._interrupted.is_set():
            self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            log.info("deliver-%s: a rebalance cancelled the sends in hand", self.channel)
        finally:
            self._task = None
        for w in work:
            if len(w.results) < len(w.targets):
                w.cancelled = True

    async def _lane(self, work: list[Work]) -> None:
        """One partition's deliveries, one at a time, in offset order."""
        for w in work:
            for endpoint in w.targets:
                started = datetime.now(UTC)
                t0 = time.perf_counter()
                result = await self._provider.send(endpoint, w.item.payload or {})
                self._metrics.send_seconds.labels(self.channel).observe(time.perf_counter() - t0)
                self._metrics.sends.labels(self.channel, result.outcome).inc()
                w.results[endpoint.id] = result
                assert w.item.delivery_id is not None
                w.attempts.append(
                    store.Attempt(
                        w.item.delivery_id,
                        w.attempt,
                        endpoint.id,
                        result.outcome,
                        result.status_code,
                        result.error,
                        result.provider_message_id,
                        started,
                        datetime.now(UTC),
                    )
                )

    # -- 4: route ------------------------------------------------------------------------

    def _route(self, batch: Batch) -> None:
        records: list[OutRecord] = []
        finishes: list[store.Finish] = []
        channel = self.channel
        max_attempts = self._settings.delivery.max_attempts
        for w in batch.work or []:
            if w.cancelled:
                continue
            v = settle(w, max_attempts)
            delivered = any(r.outcome == "ok" for r in w.results.values()) or "ok" in w.settled.values()
            message_id = next(
                (
                    r.provider_message_id
                    for r in w.results.values()
                    if r.outcome == "ok" and r.provider_message_id
                ),
                None,
            )
            assert w.item.delivery_id is not None
            finishes.append(
                store.Finish(
                    w.item.delivery_id, w.attempt, v.status, v.reason, v.error, message_id, delivered
                )
            )
            if v.status == "retrying":
                records.append(self._retry_record(w, v.retry_after_s))
            elif v.status == "failed":
                assert v.reason is not None
                records.append(self._dead_letter(w.item, v.reason, v.error or v.reason, w.attempt))
        for item in batch.unreadable:
            records.append(
                self._dead_letter(item, "permanent", item.problem or "unreadable", item.attempts_before)
            )
        if records:
            self._publisher.publish(records)
        batch.finishes = finishes
        batch.published = True
        for rec in records:
            if rec.reason is not None:
                self._metrics.dead_letters.labels(channel, rec.reason).inc()

    def _retry_record(self, w: Work, retry_after_s: float | None) -> OutRecord:
        index = pick_tier(self._tiers, w.attempt, retry_after_s)
        delay = max(self._tiers[index], retry_after_s or 0.0)
        due_ms = int((time.time() + delay) * 1000)
        tier = self._settings.delivery.retry_tiers[index]
        self._metrics.retried.labels(self.channel, tier).inc()
        msg = w.item.msg
        headers: Headers = [(k, v) for k, v in _pairs(msg) if k not in RETRY_HEADERS]
        headers += [(H_ATTEMPTS, struct.pack(">i", w.attempt)), (H_DUE, str(due_ms).encode())]
        return OutRecord(self._topics.retry(self.channel, tier), msg.value(), msg.key(), headers)

    def _dead_letter(self, item: Item, reason: str, error: str, attempts: int) -> OutRecord:
        rec = dead_letter(item.msg, self._topics.deliveries_dlq(self.channel), DeliveryFailed(error), reason)
        headers: Headers = [(k, v) for k, v in rec.headers if k not in RETRY_HEADERS]
        headers.append((H_ATTEMPTS, struct.pack(">i", attempts)))
        return OutRecord(rec.topic, rec.value, rec.key, headers, rec.timestamp_ms, rec.reason)

    # -- 5: record -----------------------------------------------------------------------

    def _record(self, batch: Batch) -> None:
        work = batch.work or []
        attempts = [a for w in work for a in w.attempts]
        gone = [eid for w in work for eid, r in w.results.items() if r.outcome == "gone"]
        with self._db.transaction() as cur:
            store.record_attempts(cur, attempts)
            updated = store.finish(cur, batch.finishes)
            store.release(cur, batch.released)
            store.disable_endpoints(cur, gone)
        batch.recorded = True
        m = self._metrics
        for f in batch.finishes:
            if f.id in updated and f.status != "retrying":
                m.deliveries.labels(self.channel, f.status).inc()
        if len(updated) < len(batch.finishes):
            log.warning(
                "deliver-%s: %d outcomes came after another consumer took the delivery over (lease expired)",
                self.channel,
                len(batch.finishes) - len(updated),
            )
        for _, reason in batch.skipped:
            m.skipped.labels(self.channel, reason).inc()
        if gone:
            m.endpoints_disabled.labels(self.channel).inc(len(set(gone)))


def _after_deferral(batch: Batch, item: Item) -> bool:
    d = batch.deferrals.get(item.tp)
    return d is not None and item.offset >= d.offset


def _pairs(msg: Message) -> list[tuple[str, str | bytes | None]]:
    raw = msg.headers() or []
    return list(raw.items()) if isinstance(raw, dict) else list(raw)
