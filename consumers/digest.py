"""``herald digest``: digest entries in, one digest per event-time window out.

Reads ``<prefix>.digests.pending`` (group ``herald-digest``) on the shared batch loop.
Each record is one digest item: a delivery row ingest wrote (a warning, or a critical the
rate limit folded), with its window fixed at ingest (``window_start``, ``window_seconds``).

Per batch (``apply``), in ONE PostgreSQL transaction, in this order:

1. drop items already known (``digest_items`` is unique per delivery id: a replayed or
   redelivered item is a duplicate, whatever became of its window);
2. read the newest window (highest ``sequence``) of each ``(user, channel, batch_key,
   window_start)`` the batch touches, and lock it;
3. assign each new item to that window while it is open and below ``max_items``; else to
   the next sequence (a follow-up window). A window that reaches ``max_items`` is due at once;
4. create or grow the windows, insert the items; then (the loop) commit the offsets.

Closing (``tick``, every ``HERALD_DIGEST__TICK_S``, records or not), page by page:

1. in one transaction: lock due windows (``closes_at`` passed: end + grace + the user's share
   of ``HERALD_DIGEST__SPREAD_S``, or full) with
   ``SKIP LOCKED``, so several digest processes split them; leave out items the user read
   (one aggregate statement: one snapshot of ``read_at``); record each window ``sent`` (its
   digest delivery row, ``queued``, and the record) or ``suppressed`` (every item read),
   with the items it left out; commit;
2. publish the digests to ``<prefix>.deliveries.<channel>`` and wait for the acks;
3. mark the digest rows published;
4. once every due page is out: settle the items' delivery rows, ``digested`` or
   ``suppressed`` (one row per item: the slow part, kept off the digests' path).

A crash between 1 and 3 leaves a sent window whose row is unpublished: the relay (on the
tick, after ``outbox_relay_after_s``) publishes its stored record again, the same bytes.
A record published twice is harmless: channel consumers never send a delivery id twice.
A crash before 4 leaves the window unsettled: the relay settles it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import Message

from config.settings import Settings
from core import metrics
from core.digest import DigestItem, close_delay, digest_id, digest_record
from core.errors import DatabaseUnavailable, HeraldError
from core.policy import DEFAULT_WINDOW_SECONDS, align_window
from producers.publisher import OutRecord, Publisher
from producers.topics import Topics
from storage import digests as store
from storage.db import Database
from storage.notifications import mark_published

log = logging.getLogger(__name__)

PAGE = 2000  # windows closed per transaction
# Pages per tick: a backlog of due windows (after an outage) must not keep the loop from
# polling past max.poll.interval.ms; the next tick goes on.
MAX_PAGES = 10
RELAY_PAGE = 1000
OPEN_GAUGE_EVERY_S = 5.0
# Structured log context of every line of this consumer (HERALD_LOG_FORMAT=json).
_CTX: dict[str, Any] = {"consumer": "digest"}


class WindowContention(DatabaseUnavailable):
    """Another process closed or filled a window while this batch added to it: retry the batch."""


@dataclass(frozen=True, slots=True)
class Pending:
    """One digest item, as read from its record."""

    delivery_id: uuid.UUID
    notification_id: uuid.UUID | None
    user_id: str
    channel: str
    batch_key: str
    window_start: datetime
    window_seconds: int
    severity: str
    title: str
    target_url: str | None
    occurred_at: datetime

    @property
    def key(self) -> store.WindowKey:
        return (self.user_id, self.channel, self.batch_key, self.window_start)


@dataclass
class Batch:
    items: list[Pending]
    unreadable: int = 0
    repeated: int = 0  # the same delivery id twice in the batch


@dataclass
class Totals:
    """What this process did, for logs and tests."""

    added: int = 0
    duplicates: int = 0
    unreadable: int = 0
    sent: int = 0
    suppressed: int = 0
    republished: int = 0
    close_lags: list[float] = field(default_factory=list)
    first_batch_at: float | None = None  # perf_counter when the first batch began to apply


def parse(msg: Message, fallback_window_s: int) -> Pending:
    """A digest entry record; ``ValueError`` (or ``KeyError``) when unreadable."""
    p = json.loads(msg.value() or b"")
    if not isinstance(p, dict):
        raise ValueError("not a JSON object")
    occurred = datetime.fromisoformat(p["occurred_at"])
    if p.get("window_start") and p.get("window_seconds"):
        start, seconds = datetime.fromisoformat(p["window_start"]), int(p["window_seconds"])
    else:  # written by an ingest before windows were fixed there
        seconds = fallback_window_s
        start = align_window(occurred, seconds)
    nid = p.get("notification_id")
    return Pending(
        delivery_id=uuid.UUID(str(p["delivery_id"])),
        notification_id=uuid.UUID(str(nid)) if nid else None,
        user_id=str(p["user_id"]),
        channel=str(p["channel"]),
        batch_key=str(p.get("batch_key") or ""),
        window_start=start,
        window_seconds=seconds,
        severity=str(p.get("severity") or "warning"),
        title=str(p.get("title") or ""),
        target_url=p.get("target_url"),
        occurred_at=occurred,
    )


def assign(
    items: Sequence[Pending], newest: dict[store.WindowKey, store.Latest], max_items: int
) -> tuple[list[store.WindowAdd], list[store.ItemRow]]:
    """Step 3: which window (and follow-up) each new item goes to. Pure."""
    by_key: dict[store.WindowKey, list[Pending]] = {}
    for item in items:
        by_key.setdefault(item.key, []).append(item)
    adds: list[store.WindowAdd] = []
    rows: list[store.ItemRow] = []
    for key, group in by_key.items():
        group.sort(key=lambda p: (p.occurred_at, p.delivery_id))  # the oldest fill a window first
        cur = newest.get(key)
        if cur is None:
            seq, used = 0, 0
        elif cur.status == "open" and cur.item_count < max_items:
            seq, used = cur.sequence, cur.item_count
        else:
            seq, used = cur.sequence + 1, 0
        first = group[0]
        i = 0
        while i < len(group):
            take = group[i : i + max_items - used]
            wid = digest_id(key[0], key[1], key[2], key[3], seq)
            full = used + len(take) >= max_items
            adds.append(store.WindowAdd(wid, key, first.window_seconds, seq, len(take), full))
            rows += [
                store.ItemRow(
                    p.delivery_id, wid, p.notification_id, p.severity, p.title, p.target_url, p.occurred_at
                )
                for p in take
            ]
            i += len(take)
            seq, used = seq + 1, 0
    return adds, rows


class DigestHandler:
    """The batch handler of ``herald digest`` (see the module docstring for the order)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        close_db: Database,
        publisher: Publisher,
        topics: Topics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._cfg = settings.digest
        self._db = db  # the batch worker's
        self._close_db = close_db  # the tick's (the loop's thread)
        self._publisher = publisher
        self._topics = topics
        self._clock = clock
        self._fallback_window_s = settings.policy.digest_seconds or (
            settings.policy.digest_minutes * 60 or DEFAULT_WINDOW_SECONDS
        )
        self._next_tick = 0.0
        self._next_relay = 0.0
        self._next_gauge = 0.0
        self._metrics = metrics.digest()
        self.totals = Totals()

    # -- the batch loop's interface ------------------------------------------------------

    def _close_delay(self, user_id: str) -> float:
        return close_delay(user_id, self._cfg.grace_s, self._cfg.spread_s)

    def prepare(self, messages: Sequence[Message]) -> Batch:
        batch = Batch([])
        seen: set[uuid.UUID] = set()
        for msg in messages:
            try:
                item = parse(msg, self._fallback_window_s)
            except (ValueError, KeyError, TypeError) as exc:
                # Only ingest writes this topic: a record it cannot have written is skipped.
                log.warning(
                    "%s[%d]@%d: unreadable digest entry (%s); skipped",
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    type(exc).__name__,
                    extra={
                        **_CTX,
                        "topic": msg.topic(),
                        "partition": msg.partition(),
                        "offset": msg.offset(),
                        "outcome": "skipped",
                    },
                )
                batch.unreadable += 1
                continue
            if item.delivery_id in seen:
                batch.repeated += 1
            else:
                seen.add(item.delivery_id)
                batch.items.append(item)
        return batch

    def apply(self, batch: Batch) -> None:
        """Steps 1 to 4 in one transaction; a retry starts them afresh."""
        items = batch.items
        if not items:
            self.totals.unreadable += batch.unreadable
            return
        if self.totals.first_batch_at is None:
            self.totals.first_batch_at = time.perf_counter()
        with self._db.transaction() as cur:
            known = store.known_items(cur, [i.delivery_id for i in items])
            new = [i for i in items if i.delivery_id not in known]
            keys = sorted({i.key for i in new})
            newest = store.latest(cur, keys)
            adds, rows = assign(new, newest, self._cfg.max_items)
            changed = store.add_to_windows(cur, adds, self._close_delay)
            if len(changed) < len(adds):
                raise WindowContention("a window was closed while this batch added to it")
            inserted = store.insert_items(cur, rows)
            if len(inserted) < len(rows):
                raise WindowContention("another digest process added the same items meanwhile")
        dup = len(items) - len(new) + batch.repeated
        self._metrics.items.labels("added").inc(len(new))
        self._metrics.items.labels("duplicate").inc(dup)
        t = self.totals
        t.added += len(new)
        t.duplicates += dup
        t.unreadable += batch.unreadable

    def tick(self) -> None:
        """Close due windows; now and then, republish stranded digests and count open windows."""
        now = self._clock()
        if now < self._next_tick:
            return
        self._next_tick = now + self._cfg.tick_s
        try:
            self.close_due()
            if now >= self._next_relay:
                self._next_relay = now + self._settings.outbox_relay_every_s
                self.relay()
            if now >= self._next_gauge:
                self._next_gauge = now + OPEN_GAUGE_EVERY_S
                with self._close_db.transaction() as cur:
                    self._metrics.open_windows.set(store.open_windows(cur))
        except HeraldError as exc:
            # PostgreSQL or the broker is away: the windows stay open (or unpublished); next tick.
            log.warning("digest: closing windows: %s; trying again on the next tick", exc, extra=_CTX)

    # -- closing ---------------------------------------------------------------------------

    def close_due(self) -> int:
        """Close every due window, page by page, then settle their items; returns how many closed.

        The digests go out first: the items' delivery rows (one update per item) wait until
        every due page is published, so they never delay a digest.
        """
        total = 0
        done: list[uuid.UUID] = []
        while True:
            started = time.perf_counter()
            with self._close_db.transaction() as cur:
                due = store.claim_due(cur, PAGE)
                closed = self._decide(due, store.summaries(cur, [w.id for w in due], self._cfg.titles))
                store.close(cur, closed)
            records = [self._encode(c.record, c.window.channel, c.window.user_id) for c in closed if c.record]
            try:
                if records:
                    self._publisher.publish(records)
                    with self._close_db.transaction() as cur:
                        mark_published(cur, [c.window.id for c in closed if c.record])
            finally:
                # The windows closed for good above: counted even when the publish fails (the
                # relay publishes those digests later, counted again only as republished).
                self._account(closed, time.perf_counter() - started)
            done += [c.window.id for c in closed]
            total += len(closed)
            if len(due) < PAGE or len(done) >= MAX_PAGES * PAGE:
                break
        for lo in range(0, len(done), PAGE):
            with self._close_db.transaction() as cur:
                store.settle(cur, done[lo : lo + PAGE])
        return total

    def _decide(
        self, due: Sequence[store.DueWindow], summaries: dict[uuid.UUID, store.Summary]
    ) -> list[store.Closed]:
        out = []
        for w in due:
            s = summaries.get(w.id)
            if s is None or s.unread == 0:
                out.append(store.Closed(w, "suppressed", None, 0, s.left_out if s else ()))
                continue
            record = digest_record(
                delivery_id=w.id,
                user_id=w.user_id,
                channel=w.channel,
                batch_key=w.batch_key,
                window_start=w.window_start,
                window_seconds=w.window_seconds,
                sequence=w.sequence,
                count=s.unread,
                first=[
                    DigestItem(n, t, u)
                    for n, t, u in zip(s.notification_ids, s.titles, s.target_urls, strict=True)
                ],
                critical=s.critical,
                inbox_path=self._cfg.inbox_path,
                policy=self._settings.policy,
            )
            out.append(store.Closed(w, "sent", record, s.unread, s.left_out))
        return out

    def _encode(self, record: dict[str, Any], channel: str, user_id: str) -> OutRecord:
        return OutRecord(
            topic=self._topics.deliveries(channel),
            key=user_id.encode(),
            value=json.dumps(record, separators=(",", ":")).encode(),
            headers=[("herald-delivery-id", str(record["delivery_id"]).encode())],
        )

    def relay(self) -> int:
        """Publish sent digests whose records were never acknowledged, and settle the items of
        windows closed by a tick that died before settling them (a crash in between)."""
        after = self._settings.outbox_relay_after_s
        while True:
            with self._close_db.transaction() as cur:
                ids = store.unsettled(cur, after, PAGE)
                store.settle(cur, ids)
            if len(ids) < PAGE:
                break
        total = 0
        while True:
            with self._close_db.transaction() as cur:
                rows = store.stranded(cur, after, RELAY_PAGE)
                if rows:
                    self._publisher.publish([self._encode(r, ch, u) for r, ch, u in rows])
                    mark_published(cur, [uuid.UUID(str(r["delivery_id"])) for r, _, _ in rows])
            total += len(rows)
            if len(rows) < RELAY_PAGE:
                break
        if total:
            self._metrics.republished.inc(total)
            self.totals.republished += total
            log.warning("digest relay: published %d digests that were left unpublished", total, extra=_CTX)
        return total

    def _account(self, closed: Sequence[store.Closed], seconds: float) -> None:
        """``seconds``: the page's closing time, from the claim to the acks and the mark."""
        m, t = self._metrics, self.totals
        for c in closed:
            m.digests.labels(c.window.channel, c.status).inc()
            lag = c.window.lag_s + seconds
            m.close_lag.observe(lag)
            t.close_lags.append(lag)
            if c.status == "sent":
                m.items_per_digest.labels(c.window.channel).observe(c.unread)
                t.sent += 1
            else:
                t.suppressed += 1
        if closed and log.isEnabledFor(logging.DEBUG):
            log.debug("digest: closed %d windows", len(closed), extra=_CTX)
            for c in closed:
                w = c.window
                log.debug(
                    "digest: window %s (%s) closed: %s, %d unread item(s)",
                    w.id,
                    w.channel,
                    c.status,
                    c.unread,
                    extra={**_CTX, "delivery_id": w.id, "channel": w.channel, "outcome": c.status},
                )
