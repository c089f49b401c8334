"""``herald bench digest``: digest items per second into windows, and how soon windows close.

A run, in this order:

1. backends: an existing stack when ``HERALD_KAFKA_BOOTSTRAP`` and
   ``HERALD_DATABASE_URL`` are both set, else an embedded one (``common.backends``);
2. migrations; ``fsync`` and ``synchronous_commit`` must be on (the defaults);
3. the workload: N warnings over U users, all in one event-time window per user (length
   ``--window-s``), a window that ends after the items are expected in. Their
   notifications and delivery rows are bulk-loaded (COPY), as ingest would have left
   them; their digest entries (the records ingest publishes) go to a fresh
   ``<prefix>.digests.pending``. Ids carry the run id: runs never collide;
4. run the real digest process (``herald.processes.run_digest`` on a thread) and time it
   from its first batch to the moment the group has committed past the last offset
   (``items_per_s``; the group join is excluded);
5. wait until every window closed (end + grace, then the tick): the close lag of a window
   is how long after its closing time its digest was committed and acknowledged;
6. verify the end state (one digest per user, every item ``digested``), print a summary
   and, last, one JSON line.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from config.settings import Settings
from core import policy
from core.errors import ConfigError
from herald.bench import common
from herald.bench.common import (
    BenchError,
    CommitWatch,
    Conn,
    ConsumerThread,
    backends,
    check_durability,
    emit_json,
    produce,
    progress,
    say,
)
from herald.processes import DigestRun, run_digest
from producers.publisher import Position
from producers.topics import Topics, ensure_topics
from storage.db import connect
from storage.migrate import migrate

SESSION_TIMEOUT_MS = 10_000
DEFAULT_GRACE_S = 2.0
TICK_S = 0.1
CHANNEL = "webhook"
# Expected pace while the window is chosen: items/s in, and a margin for produce and the
# group join (about half the session timeout on the embedded broker).
PLANNING_RATE = 7_000
PLANNING_MARGIN_S = 3.0


@dataclass
class Workload:
    users: list[str]
    window_start: datetime
    records: list[tuple[bytes, bytes]]  # (key, value)
    notifications: io.BytesIO  # COPY text for notifications
    deliveries: io.BytesIO  # COPY text for deliveries


def run_digest_bench(
    settings: Settings, *, items: int, users: int, window_s: int, grace_s: float | None = None
) -> int:
    """Run the whole benchmark; returns the process exit code."""
    if items < users or users < 1 or window_s < 1:
        raise ConfigError("need --items >= --users >= 1 and --window-s >= 1")
    run_id = uuid.uuid4().hex[:10]
    with backends(settings) as (base, where):
        grace = grace_s if grace_s is not None else DEFAULT_GRACE_S
        user_session = (
            "session_timeout_ms" in base.model_fields_set or "HERALD_SESSION_TIMEOUT_MS" in os.environ
        )
        bench = base.model_copy(
            update={
                "topic_prefix": f"bench{run_id}",
                "session_timeout_ms": base.session_timeout_ms if user_session else SESSION_TIMEOUT_MS,
                "metrics_port": -1,
                "digest": base.digest.model_copy(
                    update={
                        "grace_s": grace,
                        "tick_s": TICK_S,
                        "max_items": max(base.digest.max_items, items),
                    }
                ),
            }
        )
        say(f"herald bench digest: run {run_id}, {where}")
        return _run(bench, run_id, items=items, users=users, window_s=window_s)


def _run(settings: Settings, run_id: str, *, items: int, users: int, window_s: int) -> int:
    url = settings.database_url.get_secret_value()
    migrate(url)
    with connect(url, autocommit=True) as conn:
        durability = check_durability(conn)
    machine = common.machine()
    say(f"machine: {machine['cores']} cores, {machine['platform']}, Python {machine['python']}")
    say("postgres: " + ", ".join(f"{k}={v}" for k, v in durability.items()))

    lead = PLANNING_MARGIN_S + settings.session_timeout_ms / 2000 + items / PLANNING_RATE
    work = generate(run_id, items, users, window_s, datetime.now(UTC) + timedelta(seconds=lead), settings)
    closes = work.window_start + timedelta(seconds=window_s + settings.digest.grace_s)
    with connect(url) as conn:
        load_rows(conn, work)
    say(
        f"workload: {items:,} warnings over {users:,} users, one {window_s} s window each "
        f"({work.window_start:%H:%M:%S}Z, closing at {closes:%H:%M:%S}Z with grace "
        f"{settings.digest.grace_s:g} s); notifications and delivery rows bulk-loaded"
    )
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, [topics.digests_pending, topics.deliveries(CHANNEL)])
    positions = produce(settings, topics.digests_pending, work.records, "digest entries")
    run, first, end = measure(settings, f"bench-digest-{run_id}", positions, items, closes)
    seconds = end - first
    rate = items / seconds
    t = run.handler.totals
    lags = sorted(t.close_lags)
    p99 = percentile(lags, 0.99)
    say(
        f"digest: {items:,} items in {seconds:.2f} s = {rate:,.0f} items/s (batch_size "
        f"{settings.batch_size}, {settings.topic_partitions} partitions, group join excluded; "
        f"added {t.added:,}, duplicates {t.duplicates:,})"
    )
    say(
        f"close: {t.sent:,} digests sent, {t.suppressed:,} suppressed; close lag after end + grace: "
        f"p50 {percentile(lags, 0.5):.2f} s, p99 {p99:.2f} s, max {lags[-1] if lags else 0:.2f} s"
    )
    problems = verify(url, work, items)
    for p in problems:
        progress(f"WARNING: {p}")
    if not problems:
        say(f"verify: ok, one digest per user ({users:,}), every item digested once")
    emit_json(
        {
            "items": items,
            "items_per_s": round(rate, 1),
            "digests": t.sent,
            "close_lag_p99_s": round(p99, 3),
            "close_lag_p50_s": round(percentile(lags, 0.5), 3),
            "close_lag_max_s": round(lags[-1] if lags else 0.0, 3),
            "users": users,
            "window_s": window_s,
            "grace_s": settings.digest.grace_s,
            "seconds": round(seconds, 3),
            "machine": machine,
            "batch_size": settings.batch_size,
            "partitions": settings.topic_partitions,
            "postgres": durability,
            "run_id": run_id,
            "verified": not problems,
        }
    )
    return 1 if problems else 0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


# -- workload ---------------------------------------------------------------------------------


def generate(
    run_id: str, items: int, users: int, window_s: int, after: datetime, settings: Settings
) -> Workload:
    """Digest entries as ingest writes them, and the rows ingest would have stored for them.

    Every user's items fall in the first window that starts after ``after``, spread over it.
    """
    start = policy.align_window(after, window_s) + timedelta(seconds=window_s)
    names = [f"{run_id}-u{j}" for j in range(users)]
    records: list[tuple[bytes, bytes]] = []
    notes, rows = io.BytesIO(), io.BytesIO()
    for i in range(items):
        user = names[i % users]
        nid = uuid.uuid5(uuid.NAMESPACE_URL, f"{run_id}/{i}")
        did = policy.delivery_id(nid, CHANNEL)
        at = start + timedelta(seconds=window_s * (i // users) / max(1, items // users))
        title = f"Nightly job {i} failed"
        payload = policy.external_record(
            delivery_id=did,
            notification_id=nid,
            user_id=user,
            channel=CHANNEL,
            route=policy.DIGEST,
            reason=policy.REASON_WARNING,
            severity="warning",
            type="job.failed",
            category="jobs",
            title=title,
            summary=None,
            target_url=f"/jobs/{i}",
            batch_key=None,
            occurred_at=at,
            policy=settings.policy,
            window_start=start,
            window_seconds=window_s,
        )
        records.append((user.encode(), json.dumps(payload, separators=(",", ":")).encode()))
        ts = at.isoformat()
        notes.write(f"{nid}\t{user}\tbench\tjob.failed\twarning\t{title}\tk:{i}\t{ts}\n".encode())
        rows.write(
            f"{did}\t{nid}\t{user}\t{CHANNEL}\tdigest\twarning\t{start.isoformat()}\t{window_s}\n".encode()
        )
    return Workload(names, start, records, notes, rows)


def load_rows(conn: Conn, work: Workload) -> None:
    """COPY the notifications and their digest delivery rows (published, as ingest leaves them)."""
    started = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(
            "COPY notifications (id, user_id, source, type, severity, title, idempotency_key, occurred_at)"
            " FROM STDIN"
        ) as cp:
            cp.write(work.notifications.getvalue())
        with cur.copy(
            "COPY deliveries (id, notification_id, user_id, channel, route, reason, window_start,"
            " window_seconds) FROM STDIN"
        ) as cp:
            cp.write(work.deliveries.getvalue())
        cur.execute(
            "UPDATE deliveries SET published_at = now() WHERE user_id = ANY(%s) AND published_at IS NULL",
            (work.users,),
        )
    progress(
        f"loaded {len(work.records):,} notifications and delivery rows"
        f" in {time.perf_counter() - started:.1f} s"
    )


# -- the measured run -------------------------------------------------------------------------


def measure(
    settings: Settings, group: str, positions: list[Position], items: int, closes: datetime
) -> tuple[DigestRun, float, float]:
    """Steps 4 and 5: returns the run, and (first batch, last commit) on the perf_counter clock."""
    run = ConsumerThread("digest", lambda stopper: run_digest(settings, group=group, stopper=stopper))
    watch = CommitWatch(settings, group, positions)
    run.start()
    url = settings.database_url.get_secret_value()
    try:
        end = _wait(watch.done, run, run.launched + 120 + items / 1000, "commit every item")
        progress(f"digest: every item committed; windows close at {closes:%H:%M:%S}Z")
        with connect(url, autocommit=True) as conn:
            deadline = time.perf_counter() + max(0.0, (closes - datetime.now(UTC)).total_seconds()) + 60
            _wait(lambda: _open_windows(conn) == 0, run, deadline, "close every window")
        time.sleep(2 * TICK_S)
    finally:
        run.stop()
        watch.close()
    digest_run = run.result()
    first = digest_run.handler.totals.first_batch_at
    if first is None:
        raise BenchError("digest processed no batch")
    return digest_run, first, end


def _wait(check: Callable[[], bool], run: ConsumerThread[DigestRun], deadline: float, what: str) -> float:
    next_line = time.perf_counter() + 1.0
    while True:
        now = time.perf_counter()
        if check():
            return now
        if not run.alive():
            raise BenchError(f"digest stopped before it could {what}")
        if now > deadline:
            raise BenchError(f"digest did not {what} in time")
        if now >= next_line:
            next_line = now + 1.0
            progress(f"digest: waiting to {what}")
        time.sleep(0.02)


def _open_windows(conn: Conn) -> int:
    row = conn.execute("SELECT count(*) FROM digest_windows WHERE status = 'open'").fetchone()
    return int(row[0]) if row else 0


def verify(url: str, work: Workload, items: int) -> list[str]:
    problems = []
    with connect(url, autocommit=True) as conn:
        windows = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'sent'), coalesce(sum(item_count), 0)"
            " FROM digest_windows WHERE user_id = ANY(%s)",
            (work.users,),
        ).fetchone()
        digested = conn.execute(
            "SELECT count(*) FROM deliveries WHERE user_id = ANY(%s) AND status = 'digested'", (work.users,)
        ).fetchone()
        unpublished = conn.execute(
            "SELECT count(*) FROM deliveries d JOIN digest_windows w ON w.id = d.id"
            " WHERE w.user_id = ANY(%s) AND d.published_at IS NULL",
            (work.users,),
        ).fetchone()
    users = len(work.users)
    if windows != (users, users, items):
        problems.append(f"windows (all, sent, items) {windows}, expected {(users, users, items)}")
    if digested != (items,):
        problems.append(f"{digested} item rows digested, expected {items}")
    if unpublished != (0,):
        problems.append(f"{unpublished} digest rows unpublished")
    return problems
