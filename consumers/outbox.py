"""The outbox: delivery rows in PostgreSQL are the truth, records on the topics their copy.

Ingest writes a delivery row in the batch's transaction, publishes its record, then
marks the row published. A batch that crashes between those steps comes again and finds
its rows (``storage.notifications.unpublished_for``). But a batch that never comes again
(offsets moved past it, retention expired, a rule changed) would strand them: the relay
publishes any row left unpublished for longer than ``outbox_relay_after_s``.

Per relay pass, in this order, in one transaction:

1. claim a page of stranded rows ``FOR UPDATE SKIP LOCKED`` (another ingest process's
   relay takes other rows, and ingest's own mark step locks the rows it publishes);
2. publish their records and wait for every ack;
3. mark them published, and commit (which releases the claims).

A crash after 2 and before 3 publishes those records once more later: harmless, since
delivery ids are deterministic and channel consumers never send one twice.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from config.settings import Settings
from core import metrics, policy
from core.errors import HeraldError
from producers.publisher import Headers, OutRecord, Publisher
from producers.topics import Topics
from storage import notifications as store
from storage.db import Database

log = logging.getLogger(__name__)

PAGE = 1000


# The event's record timestamp on the events topic (epoch ms), carried on its delivery
# records through the retry tiers: where the end-to-end latency counts from.
H_EVENT_TIME = "herald-event-time"


def encode(
    topics: Topics,
    route: str,
    channel: str,
    user_id: str,
    payload: dict[str, Any],
    event_ms: int | None = None,
) -> OutRecord:
    """A delivery (or digest entry) record: keyed by user, its delivery id in a header."""
    topic = topics.deliveries(channel) if route == policy.IMMEDIATE else topics.digests_pending
    headers: Headers = [("herald-delivery-id", str(payload["delivery_id"]).encode())]
    if event_ms is not None:
        headers.append((H_EVENT_TIME, str(event_ms).encode()))
    return OutRecord(
        topic=topic,
        key=user_id.encode(),
        value=json.dumps(payload, separators=(",", ":")).encode(),
        headers=headers,
    )


def stored_record(s: store.UnpublishedDelivery, topics: Topics, settings: Settings) -> OutRecord:
    """The record of a delivery row read back from PostgreSQL (redacted on the way out)."""
    payload = policy.external_record(
        delivery_id=s.id,
        notification_id=s.notification_id,
        user_id=s.user_id,
        channel=s.channel,
        route=s.route,
        reason=s.reason,
        severity=s.severity,
        type=s.type,
        category=s.category,
        title=s.title,
        summary=s.summary,
        target_url=s.target_url,
        batch_key=s.batch_key,
        occurred_at=s.occurred_at,
        policy=settings.policy,
        window_start=s.window_start,
        window_seconds=s.window_seconds,
    )
    return encode(topics, s.route, s.channel, s.user_id, payload)


class OutboxRelay:
    """Publishes stranded delivery rows; ``run_once`` for tests, ``start`` for a background thread."""

    def __init__(self, settings: Settings, db: Database, publisher: Publisher, topics: Topics) -> None:
        self._settings = settings
        self._db = db
        self._publisher = publisher
        self._topics = topics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Publish every stranded row, page by page; returns how many."""
        total = 0
        while True:
            with self._db.transaction() as cur:
                rows = store.claim_stranded(cur, self._settings.outbox_relay_after_s, PAGE)
                if rows:
                    self._publisher.publish([stored_record(r, self._topics, self._settings) for r in rows])
                    store.mark_published(cur, [r.id for r in rows])
            total += len(rows)
            if len(rows) < PAGE:
                break
        if total:
            metrics.ingest().outbox_relayed.inc(total)
            log.warning("outbox relay: published %d delivery rows that were left unpublished", total)
        return total

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        every = self._settings.outbox_relay_every_s
        while not self._stop.wait(every):
            try:
                self.run_once()
            except HeraldError as exc:
                # PostgreSQL or the broker is away: the rows stay claimed by nobody; next pass.
                log.warning("outbox relay: %s; trying again in %.0fs", exc, every)
