"""``herald bench ingest``: batch ingest against the seed article's one-transaction-per-event design.

A run, in this order:

1. backends: an existing stack when ``HERALD_KAFKA_BOOTSTRAP`` and
   ``HERALD_DATABASE_URL`` are both set in the environment, else an embedded one
   (``EmbeddedStack``) in a temporary folder;
2. migrations; ``fsync`` and ``synchronous_commit`` must be on (the defaults),
   or the run stops: a benchmark without durable commits measures nothing;
3. the workload: N records (10% exact re-deliveries of earlier ones) for this
   run's users only, with preferences set in one batch statement. Topic prefix
   and user ids carry the run id, so nothing is truncated and runs never collide;
4. produce every record to a fresh ``<prefix>.events`` topic;
5. run the real ingest path (``herald.processes.run_ingest`` on a thread) and
   time it from the moment its first batch starts being processed (the group
   join is excluded) to the moment the group has committed past the last offset;
6. the baseline: a sample of the same kind of values, read from a Python list,
   one PostgreSQL transaction per event, as the seed article does it;
7. verify the end state, print a summary and, last, one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from config.settings import Settings
from consumers.ingest import BatchOutcome
from core import metrics, policy
from core.envelope import Notification, expand_all, parse
from core.errors import ConfigError
from core.policy import Preferences
from herald.bench import common
from herald.bench.common import (
    BenchError,
    CommitWatch,
    Conn,
    ConsumerThread,
    Cursor,
    backends,
    check_durability,
    emit_json,
    produce,
    progress,
    say,
    wait_joined,
)
from herald.processes import IngestRun, herald_command, run_ingest
from producers.publisher import Position
from producers.topics import Topics, ensure_topics
from storage.db import connect
from storage.migrate import migrate

DEFAULT_BATCH_SIZE = 5000
SESSION_TIMEOUT_MS = 10_000
DUPLICATE_SHARE = 0.10
# Ingest outcomes that account for every record once (single-recipient events).
_PROCESSED = ("inserted", "duplicate", "invalid")
SEVERITIES = ("info", "success", "warning", "critical")
SEVERITY_WEIGHTS = (50, 20, 20, 10)
EVENT_TYPES = (
    ("invoice.payment_failed", "billing", "Payment failed for invoice"),
    ("job.failed", "jobs", "Nightly job failed"),
    ("deploy.succeeded", "deploys", "Deploy finished"),
    ("comment.created", "social", "New comment on your report"),
    ("quota.warning", "billing", "You are close to your quota"),
)
WORDS = tuple(
    "the invoice job report customer retry window account quota server queue payment deploy build"
    " region limit status owner".split()
)

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
_SEED_QUEUE_DDL = (
    "CREATE TABLE IF NOT EXISTS bench_seed_queue ("
    " id bigserial PRIMARY KEY, notification_id uuid NOT NULL, user_id text NOT NULL,"
    " channel text NOT NULL, route text NOT NULL, reason text,"
    " status text NOT NULL DEFAULT 'queued', attempts integer NOT NULL DEFAULT 0,"
    " run_after timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE INDEX IF NOT EXISTS bench_seed_queue_due ON bench_seed_queue (run_after) WHERE status = 'queued'",
)
_BULK_PREFS_SQL = """
INSERT INTO notification_preferences (user_id, email)
SELECT * FROM unnest(%s::text[], %s::bool[]) AS t ORDER BY 1
ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, updated_at = now()
"""


@dataclass
class Workload:
    """Record values in produce order, for one namespace of users."""

    users: list[str]
    records: list[tuple[bytes, bytes]]  # (key, value)
    duplicates: int

    @property
    def distinct(self) -> int:
        return len(self.records) - self.duplicates


@dataclass
class IngestResult:
    events: int
    seconds: float
    join_seconds: float
    totals: BatchOutcome


@dataclass
class BaselineResult:
    events: int
    seconds: float
    inserted: int
    commit_seconds: float


# -- entry point ------------------------------------------------------------------------------


def run_ingest_bench(
    settings: Settings, *, events: int, baseline_sample: int, users: int, processes: int = 1
) -> int:
    """Run the whole benchmark; returns the process exit code."""
    if events < 1 or users < 1 or baseline_sample < 10_000:
        raise ConfigError("need --events >= 1, --users >= 1 and --baseline-sample >= 10000")
    run_id = uuid.uuid4().hex[:10]
    with backends(settings) as (base, where):
        bench = _bench_settings(base, run_id)
        print(f"herald bench ingest: run {run_id}, {where}", flush=True)
        return _run(
            bench, run_id, events=events, baseline_sample=baseline_sample, users=users, processes=processes
        )


def _bench_settings(settings: Settings, run_id: str) -> Settings:
    user_batch = "batch_size" in settings.model_fields_set or "HERALD_BATCH_SIZE" in os.environ
    return settings.model_copy(
        update={
            "topic_prefix": f"bench{run_id}",
            "session_timeout_ms": SESSION_TIMEOUT_MS,
            "batch_size": settings.batch_size if user_batch else DEFAULT_BATCH_SIZE,
            "metrics_port": -1,
        }
    )


def _run(
    settings: Settings, run_id: str, *, events: int, baseline_sample: int, users: int, processes: int = 1
) -> int:
    url = settings.database_url.get_secret_value()
    migrate(url)
    with connect(url, autocommit=True) as conn:
        durability = check_durability(conn)
        for ddl in _SEED_QUEUE_DDL:
            conn.execute(ddl)
    machine = common.machine()
    say(f"machine: {machine['cores']} cores, {machine['platform']}, Python {machine['python']}")
    say("postgres: " + ", ".join(f"{k}={v}" for k, v in durability.items()))

    rng = random.Random(run_id)  # noqa: S311 (a workload, not a secret)
    now = datetime.now(UTC)
    work = generate(f"{run_id}-ingest", events, users, rng, now)
    sample = generate(f"{run_id}-seed", baseline_sample, users, rng, now)
    with connect(url) as conn:
        set_preferences_bulk(conn, work.users + sample.users)
    say(
        f"workload: {events:,} records ({work.duplicates:,} duplicates, {work.distinct:,} distinct), "
        f"{users:,} users (email on for {len(work.users[::2]):,}), severities "
        + " ".join(f"{s} {w}%" for s, w in zip(SEVERITIES, SEVERITY_WEIGHTS, strict=True))
    )

    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.ingest_topics())
    if processes > 1:
        seconds = measure_ingest_processes(settings, f"bench-ingest-{run_id}", topics.events, work, processes)
        rate = events / seconds
        inserted = work.distinct  # checked against the database by verify() below
        say(
            f"ingest: {events:,} records in {seconds:.2f} s = {rate:,.0f} events/s with {processes} "
            f"`herald ingest` processes (from the first record produced to the last offset committed)"
        )
    else:
        positions = produce(settings, topics.events, work.records)
        ingest = measure_ingest(settings, f"bench-ingest-{run_id}", positions, events)
        seconds, rate = ingest.seconds, events / ingest.seconds
        t = ingest.totals
        inserted = t.inserted
        say(
            f"ingest: {events:,} records in {ingest.seconds:.2f} s = {rate:,.0f} events/s "
            f"(batch_size {settings.batch_size}, {settings.topic_partitions} partitions, group join "
            f"{ingest.join_seconds:.1f} s excluded; inserted {t.inserted:,}, duplicates {t.duplicates:,}, "
            f"invalid {t.invalid:,}, immediate {t.immediate:,}, digest {t.digest:,}, "
            f"rate-limited {t.rate_limited:,})"
        )

    with connect(url) as conn:
        baseline = run_baseline(conn, settings, sample)
    base_rate = baseline.events / baseline.seconds
    say(
        f"baseline (seed design: one transaction per event; values read from a Python list, not "
        f"Kafka): {baseline.events:,} events in {baseline.seconds:.2f} s = {base_rate:,.0f} events/s; "
        f"per event {1000 * baseline.seconds / baseline.events:.2f} ms, of which COMMIT "
        f"{1000 * baseline.commit_seconds / baseline.events:.2f} ms"
    )
    ratio = rate / base_rate
    say(f"ratio: {ratio:.1f}x")

    problems = verify(url, work, baseline, sample)
    for p in problems:
        progress(f"WARNING: {p}")
    if not problems:
        say(
            f"verify: ok, {work.distinct:,} notifications stored for {work.distinct:,} distinct keys; "
            "every delivery row published"
        )
    result = {
        "events": events,
        "duplicates": work.duplicates,
        "events_per_s": round(rate, 1),
        "baseline_events_per_s": round(base_rate, 1),
        "ratio": round(ratio, 2),
        "machine": machine,
        "batch_size": settings.batch_size,
        "partitions": settings.topic_partitions,
        "processes": processes,
        "inserted": inserted,
        "seconds": round(seconds, 3),
        "baseline_events": baseline.events,
        "baseline_seconds": round(baseline.seconds, 3),
        "baseline_commit_ms": round(1000 * baseline.commit_seconds / baseline.events, 3),
        "postgres": durability,
        "run_id": run_id,
        "verified": not problems,
    }
    emit_json(result)
    return 1 if problems else 0


# -- workload ---------------------------------------------------------------------------------


def generate(namespace: str, count: int, users: int, rng: random.Random, now: datetime) -> Workload:
    """``count`` native envelopes; exactly 10% are re-deliveries of an earlier record, byte for byte.

    User and event ids start with ``namespace`` (which starts with the run id).

    Event times spread over the 24 hours before ``now``, in produce order, so
    rate-limit windows see a realistic few sends per user and minute.
    """
    user_ids = [f"{namespace}-u{j}" for j in range(users)]
    dup_at = set(rng.sample(range(1, count), round(count * DUPLICATE_SHARE))) if count > 1 else set()
    step = timedelta(days=1) / count
    start = now - timedelta(days=1)
    records: list[tuple[bytes, bytes]] = []
    originals: list[tuple[bytes, bytes]] = []
    for i in range(count):
        if i in dup_at:
            records.append(originals[rng.randrange(len(originals))])
            continue
        user = user_ids[rng.randrange(users)]
        value = json.dumps(
            _event(f"{namespace}-e{i}", user, i, rng, start + step * i), separators=(",", ":")
        ).encode()
        rec = (user.encode(), value)
        originals.append(rec)
        records.append(rec)
    return Workload(users=user_ids, records=records, duplicates=len(dup_at))


def _event(event_id: str, user: str, i: int, rng: random.Random, at: datetime) -> dict[str, Any]:
    type_, category, title = EVENT_TYPES[rng.randrange(len(EVENT_TYPES))]
    ev: dict[str, Any] = {
        "id": event_id,
        "type": type_,
        "title": f"{title} #{i}",
        "user_id": user,
        "severity": rng.choices(SEVERITIES, SEVERITY_WEIGHTS)[0],
        "source": "bench",
        "category": category,
        "body": " ".join(rng.choices(WORDS, k=24)),
        "target_url": f"/events/{i}",
        "occurred_at": at.isoformat(timespec="milliseconds"),
        "data": {"seq": i, "amount_cents": rng.randrange(100, 100_000), "region": "eu-west-1"},
    }
    if rng.random() < 0.5:
        ev["resource_id"] = f"r{i}"  # key user:type:resource, the seed's rule
    if rng.random() < 0.05:
        ev["sensitive"] = True
    return ev


def set_preferences_bulk(conn: Conn, users: Sequence[str]) -> None:
    """One batch statement for every user of the run: email on for every other user."""
    with conn.transaction():
        conn.execute(_BULK_PREFS_SQL, (list(users), [j % 2 == 0 for j in range(len(users))]))


# -- the measured ingest run ------------------------------------------------------------------


@dataclass(frozen=True)
class _Counters:
    """ingest's own Prometheus metrics, read in-process (they are process-wide).

    Each metric is collected on its own: ``REGISTRY.get_sample_value`` would run
    every collector (``/proc`` reads included) at each poll, on the ingest's GIL.
    """

    records: float
    batches: float
    batch_seconds: float

    @classmethod
    def read(cls) -> _Counters:
        records = batches = batch_seconds = 0.0
        for family in metrics.ingest().events.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("outcome") in _PROCESSED:
                    records += sample.value
        for family in metrics.ingest().batch_seconds.collect():
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    batches = sample.value
                elif sample.name.endswith("_sum"):
                    batch_seconds = sample.value
        return cls(records, batches, batch_seconds)

    def __sub__(self, other: _Counters) -> _Counters:
        return _Counters(
            self.records - other.records,
            self.batches - other.batches,
            self.batch_seconds - other.batch_seconds,
        )


def measure_ingest(
    settings: Settings, group: str, positions: Sequence[Position], events: int
) -> IngestResult:
    """Step 5 of the module docstring, with progress lines on stderr."""
    run = ConsumerThread("ingest", lambda stopper: run_ingest(settings, group=group, stopper=stopper))
    watch = CommitWatch(settings, group, positions)
    before = _Counters.read()
    run.start()
    launched = run.launched
    try:
        first, end = _follow(run, watch, before, events, launched)
    finally:
        run.stop()
        watch.close()
    totals = run.result().handler.totals
    return IngestResult(events, end - first, first - launched, totals)


def measure_ingest_processes(
    settings: Settings, group: str, topic: str, work: Workload, processes: int
) -> float:
    """Scale-out: N ``herald ingest`` processes in one group, joined before the first record.

    Timed from the first record produced to the last offset committed, so production
    (which overlaps consumption) is inside the measurement.
    """
    env = {
        **os.environ,
        "HERALD_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "HERALD_DATABASE_URL": settings.database_url.get_secret_value(),
        "HERALD_TOPIC_PREFIX": settings.topic_prefix,
        "HERALD_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "HERALD_BATCH_SIZE": str(settings.batch_size),
        "HERALD_SESSION_TIMEOUT_MS": str(settings.session_timeout_ms),
        "HERALD_METRICS_PORT": "-1",
    }
    procs = [
        subprocess.Popen(
            herald_command("--log-level", "WARNING", "ingest", "--group", group),
            env=env,
        )
        for _ in range(processes)
    ]
    try:
        wait_joined(settings, group, settings.session_timeout_ms / 1000 + 30)
        started = time.perf_counter()
        positions = produce(settings, topic, work.records)
        watch = CommitWatch(settings, group, positions)
        try:
            deadline = started + 120 + len(work.records) / 1000
            while not watch.done():
                if any(p.poll() is not None for p in procs):
                    raise BenchError("an ingest process exited before the group committed the last offset")
                if time.perf_counter() > deadline:
                    raise BenchError("ingest processes did not commit every record in time")
                time.sleep(0.05)
            return time.perf_counter() - started
        finally:
            watch.close()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)


def _follow(
    run: ConsumerThread[IngestRun], watch: CommitWatch, before: _Counters, events: int, launched: float
) -> tuple[float, float]:
    """Return (first batch started, last offset committed) on the perf_counter clock."""
    deadline = launched + 120 + events / 1000
    first: float | None = None
    next_line = launched + 1.0
    while True:
        now = time.perf_counter()
        if not run.alive():
            raise BenchError("ingest stopped before the group committed the last offset")
        if now > deadline:
            raise BenchError(f"ingest did not commit every record in {deadline - launched:.0f} s")
        c = _Counters.read() - before
        if first is None and c.batches >= 1:
            # The first batch's handler time is in the histogram: it started that long ago.
            first = now - c.batch_seconds
        if c.records >= events and watch.done():
            assert first is not None
            return first, time.perf_counter()
        if now >= next_line:
            next_line = now + 1.0
            if first is None:
                progress(f"ingest: waiting for the group join ({now - launched:.1f} s)")
            else:
                progress(
                    f"ingest: {c.records:,.0f} / {events:,} records in {now - first:.1f} s, "
                    f"{c.records / max(now - first, 1e-9):,.0f} events/s"
                )
        # Fine-grained at both ends of the measured window, where the clock readings happen.
        time.sleep(0.05 if first is not None and c.records < events else 0.01)


# -- the baseline: the seed article's one transaction per event -------------------------------


def run_baseline(conn: Conn, settings: Settings, sample: Workload) -> BaselineResult:
    """One connection, autocommit off, one commit per event; the same parse and policy as ingest."""
    check_durability(conn)  # this very session, too
    conn.commit()
    defaults = Preferences.defaults(settings.policy)
    source = settings.default_source
    values = [v for _, v in sample.records]
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
    got = cur.execute(
        _SEED_INSERT_SQL,
        (
            n.id,
            n.user_id,
            n.source,
            n.type,
            n.category,
            n.severity,
            n.title,
            n.body,
            n.summary,
            n.target_url,
            None if n.data is None else json.dumps(n.data),
            n.sensitive,
            n.idempotency_key,
            n.batch_key,
            not prefs.in_app,
            n.occurred_at,
        ),
    ).fetchone()
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


# -- the end state ----------------------------------------------------------------------------


def verify(url: str, work: Workload, baseline: BaselineResult, sample: Workload) -> list[str]:
    """Exactly one notification per distinct key, and the outbox fully drained."""
    problems = []
    with connect(url, autocommit=True) as conn:
        stored = _count(conn, "SELECT count(*) FROM notifications WHERE user_id = ANY(%s)", work.users)
        unpublished = _count(
            conn,
            "SELECT count(*) FROM deliveries WHERE user_id = ANY(%s) AND published_at IS NULL",
            work.users,
        )
        seed_stored = _count(conn, "SELECT count(*) FROM notifications WHERE user_id = ANY(%s)", sample.users)
    if stored != work.distinct:
        problems.append(f"ingest stored {stored:,} notifications, expected {work.distinct:,} distinct keys")
    if unpublished:
        problems.append(f"{unpublished:,} delivery rows of this run were never marked published")
    if not baseline.inserted == seed_stored == sample.distinct:
        problems.append(
            f"baseline inserted {baseline.inserted:,} (stored {seed_stored:,}), expected {sample.distinct:,}"
        )
    return problems


def _count(conn: Conn, sql: str, users: Sequence[str]) -> int:
    row = conn.execute(sql, (list(users),)).fetchone()
    return int(row[0]) if row else 0
