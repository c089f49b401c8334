"""The two reference figures ``herald bench ingest`` sets its own rate beside.

- **The seed design** (``run_baseline``): the article herald replaces, one PostgreSQL
  transaction per event, statement by statement. ``ratio`` = herald ÷ this.
- **The write limit** (``run_write_limit``): the rows ingest writes for the same records
  (one notification per distinct record and its delivery rows), written bare: parsed,
  planned and rendered as COPY text before the clock starts, then one COPY per table and
  one durable commit per batch of ``batch_size`` records, on one connection. No Kafka,
  no parsing, no dedupe reads. ``limit_ratio`` = herald ÷ this: how close ingest comes
  to what this database can take.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from config.settings import Settings
from core import policy
from core.envelope import Notification, expand_all, parse
from core.policy import Preferences
from herald.bench.common import Conn, Cursor, check_durability, progress
from storage.notifications import NOTIFICATION_COLUMNS, notification_row

# One transaction per event, statement by statement (the seed article's design).
_SEED_PREFS_SQL = """
INSERT INTO notification_preferences (user_id) VALUES (%s)
ON CONFLICT (user_id) DO UPDATE SET user_id = excluded.user_id
RETURNING in_app, email, push, webhook, digest_minutes
"""
_SEED_INSERT_SQL = """
WITH ins AS (
    INSERT INTO notifications (id, user_id, source, type, category, severity, title, body, summary,
        target_url, data, sensitive, idempotency_key, batch_key, hidden, occurred_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
)
SELECT count(*) FROM ins
"""
_SEED_RATE_SQL = """
INSERT INTO rate_limits (user_id, channel, window_start, count) VALUES (%s, %s, %s, 1)
ON CONFLICT (user_id, channel, window_start) DO UPDATE SET count = rate_limits.count + 1
RETURNING count
"""
_SEED_QUEUE_SQL = """
INSERT INTO bench_seed_queue (notification_id, user_id, channel, route, reason, run_after)
VALUES (%s, %s, %s, %s, %s, %s)
"""
SEED_QUEUE_DDL = (
    "CREATE TABLE IF NOT EXISTS bench_seed_queue ("
    " id bigserial PRIMARY KEY, notification_id uuid NOT NULL, user_id text NOT NULL,"
    " channel text NOT NULL, route text NOT NULL, reason text,"
    " status text NOT NULL DEFAULT 'queued', attempts integer NOT NULL DEFAULT 0,"
    " run_after timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE INDEX IF NOT EXISTS bench_seed_queue_due ON bench_seed_queue (run_after) WHERE status = 'queued'",
)


@dataclass
class BaselineResult:
    events: int
    seconds: float
    inserted: int
    commit_seconds: float


def run_baseline(conn: Conn, settings: Settings, values: Sequence[bytes]) -> BaselineResult:
    """One connection, autocommit off, one commit per event; the same parse and policy as ingest."""
    check_durability(conn)  # this very session, too
    conn.commit()
    defaults = Preferences.defaults(settings.policy)
    source = settings.default_source
    inserted = 0
    committing = 0.0
    started = time.perf_counter()
    next_line = started + 1.0
    with conn.cursor() as cur:
        for i, value in enumerate(values):
            env = parse(value, max_bytes=settings.max_event_bytes)
            for n in expand_all([env], policy=settings.policy, default_source=source, record_time=None):
                inserted += _seed_event(cur, n, defaults, settings)
            before_commit = time.perf_counter()
            conn.commit()
            now = time.perf_counter()
            committing += now - before_commit
            if now >= next_line:
                next_line = now + 1.0
                rate = (i + 1) / (now - started)
                progress(f"baseline: {i + 1:,} / {len(values):,} events, {rate:,.0f} events/s")
    return BaselineResult(len(values), time.perf_counter() - started, inserted, committing)


def _seed_event(cur: Cursor, n: Notification, defaults: Preferences, settings: Settings) -> int:
    """Preference upsert, insert-if-new, then per external delivery a rate-limit upsert and a queue row."""
    row = cur.execute(_SEED_PREFS_SQL, (n.user_id,)).fetchone()
    assert row is not None
    cols = ("in_app", "email", "push", "webhook", "digest_minutes")
    prefs = defaults.merged(dict(zip(cols, row, strict=True)))
    got = cur.execute(_SEED_INSERT_SQL, _json_data(notification_row(n, not prefs.in_app))).fetchone()
    if got is None or got[0] == 0:
        return 0  # a duplicate: no delivery task (the seed's rule)
    for d in policy.plan(n, prefs):
        window = policy.rate_window(n.occurred_at)
        counted = cur.execute(_SEED_RATE_SQL, (n.user_id, d.channel, window)).fetchone()
        over = counted is not None and counted[0] > settings.policy.rate_limit(d.channel)
        route, reason = d.route, d.reason
        if route == policy.IMMEDIATE and over:
            route, reason = policy.DIGEST, policy.REASON_RATE_LIMITED
        run_after = n.occurred_at + timedelta(minutes=prefs.digest_minutes if route == policy.DIGEST else 0)
        cur.execute(_SEED_QUEUE_SQL, (n.id, n.user_id, d.channel, route, reason, run_after))
    return 1


@dataclass
class LimitResult:
    records: int  # records the rows stand for (duplicates write nothing, as in ingest)
    notifications: int
    deliveries: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.records / self.seconds


_NOTIFICATION_COLUMNS = ", ".join(NOTIFICATION_COLUMNS)
_DATA = NOTIFICATION_COLUMNS.index("data")
_DELIVERY_COLUMNS = (
    "id, notification_id, user_id, channel, route, reason, window_start, window_seconds, published_at"
)


def run_write_limit(
    conn: Conn, settings: Settings, values: Sequence[bytes], email_users: set[str]
) -> LimitResult:
    """Write the rows ingest would write for ``values`` (record values in produce order),
    bare; see the module docstring. ``email_users`` have email on, as the bench set them."""
    check_durability(conn)
    conn.commit()
    defaults = Preferences.defaults(settings.policy)
    with_email = defaults.merged({"email": True})
    now = datetime.now(UTC)
    batches: list[tuple[bytes, bytes]] = []
    seen: set[uuid.UUID] = set()
    notes = deliveries = 0
    size = settings.batch_size
    for lo in range(0, len(values), size):
        n_rows: list[Notification] = []
        d_rows: list[policy.Decision] = []
        for value in values[lo : lo + size]:
            env = parse(value, max_bytes=settings.max_event_bytes)
            for n in expand_all(
                [env], policy=settings.policy, default_source=settings.default_source, record_time=None
            ):
                if n.id in seen:
                    continue  # a duplicate: ingest writes nothing for it
                seen.add(n.id)
                n_rows.append(n)
                d_rows += policy.plan(n, with_email if n.user_id in email_users else defaults)
        notes += len(n_rows)
        deliveries += len(d_rows)
        batches.append((_notification_copy(n_rows), _delivery_copy(d_rows, now)))
    started = time.perf_counter()
    next_line = started + 1.0
    with conn.cursor() as cur:
        for i, (n_text, d_text) in enumerate(batches):
            with cur.copy(f"COPY notifications ({_NOTIFICATION_COLUMNS}) FROM STDIN") as copy:
                copy.write(n_text)
            if d_text:
                with cur.copy(f"COPY deliveries ({_DELIVERY_COLUMNS}) FROM STDIN") as copy:
                    copy.write(d_text)
            conn.commit()
            now_t = time.perf_counter()
            if now_t >= next_line:
                next_line = now_t + 1.0
                progress(f"write limit: {min((i + 1) * size, len(values)):,} / {len(values):,} records")
    return LimitResult(len(values), notes, deliveries, time.perf_counter() - started)


def _text(value: object) -> str:
    """One field in COPY's text format."""
    if value is None:
        return "\\N"
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, datetime):
        return value.isoformat()
    s = str(value)
    if "\\" in s or "\t" in s or "\n" in s or "\r" in s:
        s = s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return s


def _lines(rows: Iterable[tuple[object, ...]]) -> bytes:
    return "".join("\t".join(_text(v) for v in row) + "\n" for row in rows).encode()


def _notification_copy(rows: Sequence[Notification]) -> bytes:
    return _lines(_json_data(notification_row(n, False)) for n in rows)


def _json_data(row: tuple[object, ...]) -> tuple[object, ...]:
    """A stored row with its ``data`` as JSON text (a ``%s::jsonb`` parameter, a COPY field)."""
    data = row[_DATA]
    return (*row[:_DATA], None if data is None else json.dumps(data), *row[_DATA + 1 :])


def _delivery_copy(rows: Sequence[policy.Decision], published_at: datetime) -> bytes:
    return _lines(
        (
            d.delivery_id,
            d.notification.id,
            d.notification.user_id,
            d.channel,
            d.route,
            d.reason,
            d.window_start,
            d.window_seconds if d.route == policy.DIGEST else None,
            published_at,
        )
        for d in rows
    )
