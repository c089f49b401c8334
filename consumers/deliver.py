"""The channel consumer: delivery records in, sends out, every outcome recorded.

One consumer group per channel (``herald-deliver-<channel>``) reads the channel's main
topic and its retry topics on the shared batch loop. Sends run on an event loop of their
own, up to ``delivery.concurrency`` in flight per process; the batch loop keeps polling
and claiming while they run. For each batch, in this order:

1. **Hold back** records not yet due (retry records carry their due time): the loop
   pauses only that partition until then.
2. **Look up and claim**, in one transaction for the batch: a record whose row is final
   (sent, failed, skipped, ...) or that is a stale copy of an earlier stage is skipped
   and counted; a row another consumer still holds (its lease is live) holds its
   partition back until the lease ends; the rest are claimed (``sending``, leased).
3. **Send**: each claimed delivery to each of its user's enabled endpoints that has not
   already taken it (or refused it for good), as soon as a send slot is free, **criticals
   first**: claimed deliveries wait for a slot in two queues on the event loop, and a
   critical one overtakes every digest and warning waiting, from its batch or an earlier
   one. A tenth of the slots are kept for criticals, so the digests of a window boundary
   (all of a tier's users at once) never make a critical wait for a send to end. A host whose
   circuit is open (``channels/breaker.py``) gets nothing: the delivery is **held**, its
   claim given back and its record parked on a retry topic until the host may be tried
   again, with no attempt spent.
4. **Route** what finished and did not go through (transient failures to the next retry
   tier, permanent ones and exhausted retries to the channel's dead-letter topic, held
   ones to their parking tier); wait for the broker's acknowledgement.
5. **Record** attempts (one row per try and endpoint) and outcomes in one transaction,
   and disable endpoints that are gone (a webhook's 410, a push subscription's 404 or 410).

Steps 4 and 5 run for whatever has finished, whichever batch it came from, many
deliveries per transaction. The loop commits each partition's offset only up to its
lowest delivery not yet recorded (``holds``), so a slow send early in a partition keeps
the offsets behind it; a crash redoes it, and never skips it. Per-user ordering is not
promised.

Step 4 comes before step 5: a crash between them leaves the row ``sending``; its record
comes again, waits for the lease, and is sent once more (the send-once window of
DESIGN.md's invariant 2, recognisable by the same ``webhook-id``). The other order
would leave a ``retrying`` row with no retry record: a lost delivery.

A rebalance or a shutdown lets the sends in flight finish for ``rebalance_grace_s``, then
cancels the rest: their claims go back and their offsets stay uncommitted, so the next
owner sends them (once more, if the cancelled request had reached the provider).

A retryable error (PostgreSQL or the broker away) retries the step that failed: what was
sent is not sent again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message, TopicPartition

from channels.base import Endpoint, Provider, SendResult
from channels.breaker import CircuitBreaker
from config.settings import Settings
from consumers.dlq import count_dead_letters, dead_letter
from consumers.loop import Deferral
from consumers.outbox import H_EVENT_TIME
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
# Set on a record parked while its host's circuit was open (no attempt was spent on it).
H_HELD = "herald-held"
RETRY_HEADERS = frozenset({H_ATTEMPTS, H_DUE, H_HELD})

# A lost claim race (another consumer claimed between our look-up and our claim): look again soon.
RACE_RETRY_S = 1.0
# The shortest a held delivery is parked: never straight back onto a host's closed door.
PARK_MIN_S = 0.5
# How long a wait for a finished send blocks before it looks at the clock again.
COLLECT_WAIT_S = 0.2
# Of the send slots, this share is only ever taken by criticals (``delivery.concurrency``
# below 10 keeps none).
URGENT_SHARE = 10


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
    # Endpoints not tried because their host's circuit is open -> seconds until it may be.
    held: dict[int, float] = field(default_factory=dict)
    cancelled: bool = False
    budget_base: int = 0  # tries before the last redrive: not counted against max_attempts


@dataclass
class Batch:
    """The prepared batch; ``apply`` works through it stage by stage and resumes where it failed."""

    items: list[Item]
    deferrals: dict[tuple[str, int], Deferral] = field(default_factory=dict)
    work: list[Work] | None = None
    skipped: list[tuple[Item, str]] = field(default_factory=list)
    unreadable: list[Item] = field(default_factory=list)
    handed_over: bool = False  # skipped and unreadable passed to the next unit
    launched: int = 0  # how many of ``work`` went to the event loop (or were given back)


@dataclass
class Unit:
    """Outcomes made durable together: one publish, one transaction."""

    works: list[Work] = field(default_factory=list)
    unreadable: list[Item] = field(default_factory=list)
    skipped: list[tuple[Item, str]] = field(default_factory=list)
    taken: bool = False  # no more finished sends join it
    finishes: list[store.Finish] = field(default_factory=list)
    released: list[tuple[uuid.UUID, int]] = field(default_factory=list)
    published: bool = False


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
        if work.attempt - work.budget_base < max_attempts:
            waits = [r.retry_after_s for r in transient if r.retry_after_s is not None]
            return Verdict("retrying", None, error, max(waits) if waits else None)
        return Verdict("failed", "exhausted", error)
    values = set(outcomes.values())
    if "permanent" in values:
        return Verdict("failed", "permanent", error or "refused by an endpoint on an earlier try")
    if "gone" in values and "ok" not in values:
        # Every endpoint is gone. One gone beside one that took it (a user's old browser's
        # push subscription beside the current one) is a delivery made: the gone one is disabled.
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
    """The batch handler of ``herald deliver`` (see the module docstring for the steps).

    Threads: ``apply`` runs on the batch loop's worker (or, at a rebalance, in the loop's
    callback; never both at once) and owns every field but the event loop's; sends run on
    the event loop's own thread and hand finished work back through a queue.
    """

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
        self._ctx: dict[str, Any] = {"consumer": f"deliver-{self.channel}", "channel": self.channel}
        self._topics = topics or Topics(settings.topic_prefix)
        self._tiers = settings.delivery.tier_seconds()
        self._concurrency = settings.delivery.concurrency
        self._grace_s = settings.delivery.rebalance_grace_s
        b = settings.breaker
        self._breaker = CircuitBreaker(
            channel=self.channel,
            failure_ratio=b.failure_ratio,
            min_attempts=b.min_attempts,
            window_s=b.window_s,
            cooldown_s=b.cooldown_s,
        )
        self._metrics = metrics.deliver()
        for outcome in OUTCOMES:
            self._metrics.outcomes.labels(self.channel, outcome)
        self._aio: asyncio.AbstractEventLoop | None = None
        self._aio_thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # the event loop's own
        self._finished: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self._in_hand: dict[uuid.UUID, Work] = {}  # claimed, not yet recorded
        self._sending = 0  # launched (queued for a slot or sending) and not yet collected
        # The event loop's own: claimed deliveries waiting for a slot, and the slots taken.
        self._urgent: deque[Work] = deque()
        self._normal: deque[Work] = deque()
        self._active = 0
        self._urgent_slots = self._concurrency // URGENT_SHARE
        self._holds: dict[tuple[str, int], set[int]] = {}  # offsets not yet recorded
        self._unit = Unit()
        self._interrupted = threading.Event()
        self._abandon_at: float | None = None

    # -- the batch loop's interface ------------------------------------------------------

    def prepare(self, messages: Sequence[Message]) -> Batch:
        return Batch([parse(m) for m in messages])

    def apply(self, batch: Batch) -> list[Deferral]:
        if batch.work is None:
            if batch.items:
                self._interrupted.clear()
                self._abandon_at = None
            self._plan(batch)
        if not batch.handed_over:
            self._unit.unreadable += batch.unreadable
            self._unit.skipped += batch.skipped
            batch.handed_over = True
        work = batch.work or []
        while batch.launched < len(work):
            # Up to `concurrency` more may wait for a slot: a critical in the next batch
            # then overtakes them instead of waiting for this batch to be under way.
            while self._sending >= 2 * self._concurrency and not self._interrupted.is_set():
                self._settle(wait=True)
            self._launch(work[batch.launched])
            batch.launched += 1
        if self._interrupted.is_set():
            # A rebalance or a shutdown: wait for what is in flight (or give it up), record it.
            while self._sending:
                self._settle(wait=True)
        self._settle(wait=False)
        self._metrics.in_flight.labels(self.channel).set(len(self._in_hand))
        return list(batch.deferrals.values())

    def holds(self) -> Mapping[tuple[str, int], int]:
        """Per partition, the lowest offset whose delivery is not recorded yet."""
        return {tp: min(offsets) for tp, offsets in self._holds.items() if offsets}

    def pending(self) -> bool:
        """Sends in flight, or finished ones not yet recorded."""
        return bool(self._in_hand) or self._sending > 0

    def interrupt(self) -> None:
        """A rebalance or a shutdown: let the sends in flight finish within the grace; what
        still waits for a slot is given back at once."""
        if not self._interrupted.is_set():
            self._abandon_at = time.monotonic() + self._grace_s
            self._interrupted.set()
            if self._aio is not None:
                self._aio.call_soon_threadsafe(self._dispatch)

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        self._forget(partitions)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        self._forget(partitions)

    def close(self) -> None:
        aio, thread = self._aio, self._aio_thread
        if aio is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._provider.aclose(), aio).result(timeout=10)
        except Exception as exc:  # noqa: BLE001 (closing: say it, and go on)
            log.warning("deliver-%s: closing the provider: %s", self.channel, exc, extra=self._ctx)
        aio.call_soon_threadsafe(aio.stop)
        thread.join(timeout=10)
        aio.close()
        self._aio = self._aio_thread = None

    def _forget(self, partitions: list[TopicPartition]) -> None:
        """Partitions change hands: their next owner starts from the committed offsets."""
        for tp in partitions:
            self._holds.pop((tp.topic, tp.partition), None)

    # -- 1 and 2: hold back, look up, claim ---------------------------------------------

    def _defer(self, batch: Batch, item: Item, resume_at: float, why: str) -> None:
        """Leave ``item``'s partition from ``item`` on for later (the lowest such offset wins)."""
        held = batch.deferrals.get(item.tp)
        if held is None or item.offset < held.offset:
            batch.deferrals[item.tp] = Deferral(item.topic, item.partition, item.offset, resume_at)
            self._metrics.deferred.labels(self.channel, why).inc()

    def _plan(self, batch: Batch) -> None:
        """Sort the batch's records and claim what is to be sent. ``batch.work`` is set last:
        until then ``apply`` plans again, so a claim transaction that failed (PostgreSQL
        away) is redone on the retry, and never taken for a batch with nothing to send
        (whose offsets the loop would then commit: the records would be lost)."""
        # What an earlier, failed try of this plan noted is noted again.
        batch.deferrals.clear()
        batch.skipped.clear()
        batch.unreadable.clear()
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
            elif (item.delivery_id, item.attempts_before) in seen or item.delivery_id in self._in_hand:
                # A copy of a delivery this process is sending: its outcome speaks for both.
                batch.skipped.append((item, "duplicate"))
            else:
                seen.add((item.delivery_id, item.attempts_before))
                live.append(item)
        if not live:
            batch.work = []
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
        work: list[Work] = []
        for item in mine:
            assert item.payload is not None and item.delivery_id is not None
            settled = done.get(item.delivery_id, {})
            targets = [
                Endpoint(e.id, e.user_id, e.address, e.secret)
                for e in found.get(str(item.payload["user_id"]), [])
                if e.id not in settled
            ]
            row = rows[item.delivery_id]
            w = Work(item, item.attempts_before + 1, targets, settled, budget_base=row.budget_base)
            work.append(w)
            self._in_hand[item.delivery_id] = w
            self._holds.setdefault(item.tp, set()).add(item.offset)
        batch.work = work

    # -- 3: send -------------------------------------------------------------------------

    def _launch(self, w: Work) -> None:
        """Queue ``w`` for a send slot on the event loop (or hand it straight back, if there
        is nothing to send)."""
        if not w.targets or self._interrupted.is_set():
            w.cancelled = bool(w.targets)  # a rebalance came first: give the claim back
            self._finished.put(w)
        else:
            self._event_loop().call_soon_threadsafe(self._enqueue, w)
        self._sending += 1

    def _enqueue(self, w: Work) -> None:
        """On the event loop: a critical waits in the queue that goes first."""
        (self._urgent if urgent(w.item) else self._normal).append(w)
        self._dispatch()

    def _dispatch(self) -> None:
        """On the event loop: start what waits while slots are free, criticals first; the
        last ``_urgent_slots`` slots take only criticals. After an interrupt, nothing starts:
        what waits goes back (its claim is released, its offset stays uncommitted)."""
        if self._interrupted.is_set():
            while self._urgent or self._normal:
                w = (self._urgent or self._normal).popleft()
                w.cancelled = True
                self._finished.put(w)
            return
        while self._active < self._concurrency:
            if self._urgent:
                w = self._urgent.popleft()
            elif self._normal and self._active < self._concurrency - self._urgent_slots:
                w = self._normal.popleft()
            else:
                return
            self._active += 1
            asyncio.get_running_loop().create_task(self._run(w))

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._aio is None:
            aio = asyncio.new_event_loop()
            self._aio_thread = threading.Thread(
                target=aio.run_forever, name=f"deliver-{self.channel}-send", daemon=True
            )
            self._aio = aio
            self._aio_thread.start()
        return self._aio

    async def _run(self, w: Work) -> None:
        """One delivery to its endpoints, one after another; always handed back."""
        task = asyncio.current_task()
        assert task is not None and w.item.delivery_id is not None
        self._tasks.add(task)
        breaker = self._breaker
        try:
            for endpoint in w.targets:
                host = self._provider.target(endpoint)
                gate = breaker.admit(host)
                if gate == "hold":
                    w.held[endpoint.id] = breaker.reopens_in(host)
                    continue
                started = datetime.now(UTC)
                t0 = time.perf_counter()
                try:
                    result = await self._provider.send(endpoint, w.item.payload or {})
                except asyncio.CancelledError:
                    breaker.cancelled(host, probe=gate == "probe")
                    raise
                breaker.record(host, result.outcome == "transient", probe=gate == "probe")
                m = self._metrics
                m.send_seconds.labels(self.channel).observe(time.perf_counter() - t0)
                m.sends.labels(self.channel, result.outcome).inc()
                m.responses.labels(self.channel, status_class(result.status_code)).inc()
                if result.outcome == "ok":
                    severity, since_ms = trip_start(w.item)
                    m.latency.labels(self.channel, severity).observe(max(0.0, time.time() - since_ms / 1000))
                w.results[endpoint.id] = result
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
        except asyncio.CancelledError:
            w.cancelled = True
        finally:
            self._tasks.discard(task)
            self._finished.put(w)
            self._active -= 1
            self._dispatch()

    def _cancel_all(self) -> None:
        self._dispatch()  # interrupted: what waits for a slot goes back
        for task in list(self._tasks):
            task.cancel()

    # -- 4 and 5: collect, route, record -------------------------------------------------

    def _collect(self, unit: Unit, wait: bool) -> None:
        """Move finished sends into ``unit``; with ``wait``, block until at least one."""
        got = 0
        while True:
            try:
                if wait and not got:
                    w = self._finished.get(timeout=COLLECT_WAIT_S)
                else:
                    w = self._finished.get_nowait()
            except queue.Empty:
                if not wait or got:
                    return
                if self._abandon_at is not None and time.monotonic() >= self._abandon_at and self._aio:
                    # Past the grace: give up what is still in flight (claims go back).
                    self._aio.call_soon_threadsafe(self._cancel_all)
                continue
            got += 1
            self._sending -= 1
            unit.works.append(w)

    def _settle(self, wait: bool) -> None:
        """Make what finished durable: route it (step 4), then record it (step 5)."""
        unit = self._unit
        if not unit.taken:
            self._collect(unit, wait)
            unit.taken = True
        if not unit.published:
            self._route(unit)
        self._record(unit)
        for w in unit.works:
            assert w.item.delivery_id is not None
            self._in_hand.pop(w.item.delivery_id, None)
            if not w.cancelled:  # a cancelled one keeps its offset uncommitted
                self._holds.get(w.item.tp, set()).discard(w.item.offset)
        self._unit = Unit()

    def _route(self, unit: Unit) -> None:
        records: list[OutRecord] = []
        finishes: list[store.Finish] = []
        released: list[tuple[uuid.UUID, int]] = []
        max_attempts = self._settings.delivery.max_attempts
        held = abandoned = 0
        tiers: list[str] = []  # counted once published: a failed publish routes the unit again
        for w in unit.works:
            assert w.item.delivery_id is not None
            if w.cancelled:
                abandoned += 1
                released.append((w.item.delivery_id, w.item.attempts_before))
                continue
            if w.held and not w.results:
                # Nothing tried: give the claim back and park the record until the host may be.
                released.append((w.item.delivery_id, w.item.attempts_before))
                records.append(self._park(w))
                held += 1
                continue
            for eid, wait in w.held.items():  # tried elsewhere: this try counts, as a transient
                w.results[eid] = SendResult("transient", error="circuit open", retry_after_s=wait)
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
            finishes.append(
                store.Finish(
                    w.item.delivery_id, w.attempt, v.status, v.reason, v.error, message_id, delivered
                )
            )
            if v.status == "retrying":
                record, tier = self._retry_record(w, v.retry_after_s)
                records.append(record)
                tiers.append(tier)
            elif v.status == "failed":
                assert v.reason is not None
                records.append(self._dead_letter(w.item, v.reason, v.error or v.reason, w.attempt))
        for item in unit.unreadable:
            records.append(
                self._dead_letter(item, "permanent", item.problem or "unreadable", item.attempts_before)
            )
        if records:
            self._publisher.publish(records)
        unit.finishes = finishes
        unit.released = released
        unit.published = True
        self._count_routed(unit, records, held=held, abandoned=abandoned, tiers=tiers)

    def _count_routed(
        self, unit: Unit, records: list[OutRecord], *, held: int, abandoned: int, tiers: list[str]
    ) -> None:
        """Once the unit's records are published (a failed publish routes it again)."""
        channel = self.channel
        if held:
            self._metrics.held.labels(channel).inc(held)
        if abandoned:
            self._metrics.abandoned.labels(channel).inc(abandoned)
        for tier in tiers:
            self._metrics.retried.labels(channel, tier).inc()
        for rec in records:
            if rec.reason is not None:
                self._metrics.dead_letters.labels(channel, rec.reason).inc()
        count_dead_letters(f"deliver-{channel}", records)
        if unit.unreadable:
            self._metrics.outcomes.labels(channel, "dlq").inc(len(unit.unreadable))

    def _tier_record(self, item: Item, index: int, delay: float, attempts: int, held: bool) -> OutRecord:
        due_ms = int((time.time() + delay) * 1000)
        tier = self._settings.delivery.retry_tiers[index]
        msg = item.msg
        headers: Headers = [(k, v) for k, v in _pairs(msg) if k not in RETRY_HEADERS]
        headers += [(H_ATTEMPTS, struct.pack(">i", attempts)), (H_DUE, str(due_ms).encode())]
        if held:
            headers.append((H_HELD, b"circuit-open"))
        return OutRecord(self._topics.retry(self.channel, tier), msg.value(), msg.key(), headers)

    def _retry_record(self, w: Work, retry_after_s: float | None) -> tuple[OutRecord, str]:
        """The record for its next retry tier, and that tier's name."""
        index = pick_tier(self._tiers, w.attempt, retry_after_s)
        delay = max(self._tiers[index], retry_after_s or 0.0)
        tier = self._settings.delivery.retry_tiers[index]
        return self._tier_record(w.item, index, delay, w.attempt, held=False), tier

    def _park(self, w: Work) -> OutRecord:
        """The record again, on the first tier that waits as long as the circuit stays open;
        due when it may be tried, with the attempts it had (none was spent)."""
        wait = max(PARK_MIN_S, *w.held.values())
        index = pick_tier(self._tiers, 1, wait)
        return self._tier_record(w.item, index, wait, w.item.attempts_before, held=True)

    def _dead_letter(self, item: Item, reason: str, error: str, attempts: int) -> OutRecord:
        rec = dead_letter(item.msg, self._topics.deliveries_dlq(self.channel), DeliveryFailed(error), reason)
        headers: Headers = [(k, v) for k, v in rec.headers if k not in RETRY_HEADERS]
        headers.append((H_ATTEMPTS, struct.pack(">i", attempts)))
        return OutRecord(rec.topic, rec.value, rec.key, headers, rec.timestamp_ms, rec.reason)

    def _record(self, unit: Unit) -> None:
        works = [w for w in unit.works if not w.cancelled or w.attempts]
        attempts = [a for w in works for a in w.attempts]
        gone = [eid for w in works for eid, r in w.results.items() if r.outcome == "gone"]
        if attempts or unit.finishes or unit.released or gone:
            with self._db.transaction() as cur:
                store.record_attempts(cur, attempts)
                updated = store.finish(cur, unit.finishes)
                store.release(cur, unit.released)
                store.disable_endpoints(cur, gone)
        else:
            updated = set()
        m = self._metrics
        for f in unit.finishes:
            if f.id in updated:
                m.outcomes.labels(self.channel, OUTCOME_OF_STATUS.get(f.status, f.status)).inc()
        if len(updated) < len(unit.finishes):
            log.warning(
                "deliver-%s: %d outcomes came after another consumer took the delivery over (lease expired)",
                self.channel,
                len(unit.finishes) - len(updated),
                extra=self._ctx,
            )
        if log.isEnabledFor(logging.DEBUG):
            self._log_outcomes(unit, updated)
        for _, reason in unit.skipped:
            m.skipped.labels(self.channel, reason).inc()
        if gone:
            m.endpoints_disabled.labels(self.channel).inc(len(set(gone)))

    def _log_outcomes(self, unit: Unit, updated: set[uuid.UUID]) -> None:
        """One DEBUG line per delivery record the unit made durable: where it was read, its
        delivery id and what became of it (``outcome``). Ids, codes and counts only."""
        finishes = {f.id: f for f in unit.finishes}
        for w in unit.works:
            item = w.item
            f = finishes.get(item.delivery_id) if item.delivery_id is not None else None
            if w.cancelled:
                self._log_item(item, "abandoned", "given back unsent (rebalance or shutdown)")
            elif f is None:
                self._log_item(item, "held", "parked: its host's circuit is open")
            elif f.id not in updated:
                self._log_item(item, "taken_over", "outcome not recorded: another consumer took it over")
            else:
                outcome = OUTCOME_OF_STATUS.get(f.status, f.status)
                why = f" ({f.reason})" if f.reason else ""
                self._log_item(item, outcome, f"attempt {f.attempt}{why}")
        for item in unit.unreadable:
            self._log_item(item, "dlq", "unreadable record (permanent)")
        for item, reason in unit.skipped:
            self._log_item(item, "skipped", SKIP_REASONS.get(reason, f"already {reason}"))

    def _log_item(self, item: Item, outcome: str, detail: str) -> None:
        log.debug(
            "deliver-%s: %s[%d]@%d: delivery %s %s: %s",
            self.channel,
            item.topic,
            item.partition,
            item.offset,
            item.delivery_id,
            outcome,
            detail,
            extra={
                **self._ctx,
                "topic": item.topic,
                "partition": item.partition,
                "offset": item.offset,
                "delivery_id": item.delivery_id,
                "outcome": outcome,
            },
        )


# A finished delivery's status, as the outcome metric names it.
OUTCOME_OF_STATUS = {"sent": "sent", "retrying": "retry", "failed": "dlq", "skipped": "skipped"}
OUTCOMES = ("sent", "retry", "dlq", "skipped")
# Why a record was skipped without a send, for its DEBUG line (else: its row's final status).
SKIP_REASONS = {"duplicate": "a copy of a delivery in hand", "stale": "a copy of an earlier stage"}
SEVERITIES = frozenset({"info", "success", "warning", "critical"})


def status_class(code: int | None) -> str:
    """``2xx`` .. ``5xx`` for an HTTP status or an SMTP reply code; ``none`` when no answer came."""
    if code is None or not 100 <= code <= 599:
        return "none"
    return f"{code // 100}xx"


def urgent(item: Item) -> bool:
    """A critical notification's delivery (not a digest): it overtakes the others for a slot."""
    payload = item.payload or {}
    return payload.get("severity") == "critical" and payload.get("type") != "digest"


def trip_start(item: Item) -> tuple[str, int]:
    """The severity label and the epoch ms a delivery's trip started: the event's record
    timestamp (carried in a header), else this record's own (a digest: when its window closed)."""
    payload = item.payload or {}
    severity = "digest" if payload.get("type") == "digest" else str(payload.get("severity"))
    if severity not in SEVERITIES and severity != "digest":
        severity = "other"
    raw = _header(item.msg, H_EVENT_TIME)
    if raw:
        try:
            return severity, int(raw.decode())
        except (ValueError, UnicodeDecodeError):
            pass
    kind, ts = item.msg.timestamp()
    return severity, ts if kind != TIMESTAMP_NOT_AVAILABLE else int(time.time() * 1000)


def _after_deferral(batch: Batch, item: Item) -> bool:
    d = batch.deferrals.get(item.tp)
    return d is not None and item.offset >= d.offset


def _pairs(msg: Message) -> list[tuple[str, str | bytes | None]]:
    raw = msg.headers() or []
    return list(raw.items()) if isinstance(raw, dict) else list(raw)
