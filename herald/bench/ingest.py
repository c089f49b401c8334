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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil

from config.settings import Settings
from consumers.ingest import BatchOutcome, Prepared
from core import metrics
from core.errors import ConfigError
from herald.bench import common
from herald.bench.common import (
    BenchError,
    CommitWatch,
    Conn,
    ConsumerThread,
    CpuMeter,
    backends,
    check_durability,
    emit_json,
    produce,
    produce_steadily,
    progress,
    say,
    wait_joined,
)
from herald.bench.references import SEED_QUEUE_DDL, BaselineResult, run_baseline, run_write_limit
from herald.processes import IngestRun, herald_command, run_ingest
from producers.publisher import Position
from producers.topics import Topics, ensure_topics
from storage.db import connect
from storage.migrate import migrate

DEFAULT_BATCH_SIZE = 5000
DEFAULT_EVENTS = 200_000
RATE_SECONDS = 30  # --rate without --events: this many seconds of records
# --rate: records of the first seconds after the group join are left out of the percentiles
# (their maximum is printed): the embedded broker's first fetches after a join take ~0.5 s.
WARMUP_MS = 2000
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


# -- entry point ------------------------------------------------------------------------------


def run_ingest_bench(
    settings: Settings,
    *,
    events: int | None,
    baseline_sample: int,
    users: int,
    processes: int = 1,
    rate: float | None = None,
    workers: int = 1,
) -> int:
    """Run the whole benchmark; returns the process exit code."""
    if rate is not None and (rate <= 0 or processes != 1 or workers != 1):
        raise ConfigError("--rate needs a rate above 0, with one process")
    if workers > 1 and processes > 1:
        raise ConfigError("--workers and --processes are two ways to scale out: give one")
    if events is None:
        events = round(rate * RATE_SECONDS) if rate else DEFAULT_EVENTS
    if events < 1 or users < 1 or baseline_sample < 10_000:
        raise ConfigError("need --events >= 1, --users >= 1 and --baseline-sample >= 10000")
    run_id = uuid.uuid4().hex[:10]
    with backends(settings) as (base, where):
        bench = _bench_settings(base, run_id, steady=rate is not None)
        print(f"herald bench ingest: run {run_id}, {where}", flush=True)
        return _run(
            bench,
            run_id,
            events=events,
            baseline_sample=baseline_sample,
            users=users,
            processes=processes,
            rate=rate,
            workers=workers,
        )


def _bench_settings(settings: Settings, run_id: str, *, steady: bool = False) -> Settings:
    """Throughput runs batch 5,000 records unless told otherwise; a steady-rate run keeps
    the configured batch size (the default, unless set): the delay it costs is the point."""
    user_batch = steady or "batch_size" in settings.model_fields_set or "HERALD_BATCH_SIZE" in os.environ
    return settings.model_copy(
        update={
            "topic_prefix": f"bench{run_id}",
            "session_timeout_ms": SESSION_TIMEOUT_MS,
            "batch_size": settings.batch_size if user_batch else DEFAULT_BATCH_SIZE,
            "metrics_port": -1,
        }
    )


def _run(
    settings: Settings,
    run_id: str,
    *,
    events: int,
    baseline_sample: int,
    users: int,
    processes: int = 1,
    rate: float | None = None,
    workers: int = 1,
) -> int:
    url = settings.database_url.get_secret_value()
    migrate(url)
    with connect(url, autocommit=True) as conn:
        durability = check_durability(conn)
        for ddl in SEED_QUEUE_DDL:
            conn.execute(ddl)
    machine = common.machine()
    say(f"machine: {machine['cores']} cores, {machine['platform']}, Python {machine['python']}")
    say("postgres: " + ", ".join(f"{k}={v}" for k, v in durability.items()))

    rng = random.Random(run_id)  # noqa: S311 (a workload, not a secret)
    now = datetime.now(UTC)
    work = generate(f"{run_id}-ingest", events, users, rng, now)
    bare = generate(f"{run_id}-limit", events, users, rng, now)
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
    group = f"bench-ingest-{run_id}"
    extra: dict[str, Any] = {}
    with connect(url, autocommit=True) as conn:
        meter = CpuMeter(settings, conn)
        if rate is not None:
            latency = measure_latency(settings, group, topics.events, work, rate, meter)
            seconds, inserted = latency.seconds, latency.totals.inserted
            extra = {
                "rate": rate,
                "p50_ms": latency.p50_ms,
                "p99_ms": latency.p99_ms,
                "max_ms": latency.max_ms,
                "warmup_max_ms": latency.warmup_max_ms,
            }
            say(
                f"ingest at a steady {rate:,.0f} records/s: {events:,} records in {seconds:.2f} s; record "
                f"time to notification commit p50 {latency.p50_ms:.0f} ms, p99 {latency.p99_ms:.0f} ms, max "
                f"{latency.max_ms:.0f} ms over {latency.counted:,} records (the first "
                f"{WARMUP_MS / 1000:.0f} s after the join left out: max {latency.warmup_max_ms:.0f} ms); "
                f"batch_size {settings.batch_size}, batch_time_ms {settings.batch_time_ms}"
            )
        elif processes > 1 or workers > 1:
            seconds = measure_ingest_processes(
                settings, group, topics.events, work, processes, meter, workers=workers
            )
            inserted = work.distinct  # checked against the database by verify() below
            how = (
                f"{processes} `herald ingest` processes"
                if processes > 1
                else f"one `herald ingest --workers {workers}`"
            )
            say(
                f"ingest: {events:,} records in {seconds:.2f} s = {events / seconds:,.0f} events/s with "
                f"{how} (from the first record produced to the last offset committed)"
            )
        else:
            positions = produce(settings, topics.events, work.records)
            ingest = measure_ingest(settings, group, positions, events, meter)
            seconds = ingest.seconds
            t = ingest.totals
            inserted = t.inserted
            say(
                f"ingest: {events:,} records in {seconds:.2f} s = {events / seconds:,.0f} events/s "
                f"(batch_size {settings.batch_size}, {settings.topic_partitions} partitions, group join "
                f"{ingest.join_seconds:.1f} s excluded; inserted {t.inserted:,}, "
                f"duplicates {t.duplicates:,}, invalid {t.invalid:,}, immediate {t.immediate:,}, "
                f"digest {t.digest:,}, rate-limited {t.rate_limited:,})"
            )
        cpu = {k: None if v is None else round(1e6 * v / events, 1) for k, v in meter.read().items()}
    events_per_s = events / seconds
    shown = (f"{k} {'n/a (not on this machine)' if v is None else f'{v:.1f} µs'}" for k, v in cpu.items())
    say("CPU per record: " + ", ".join(shown))

    with connect(url) as conn:
        limit = run_write_limit(conn, settings, [v for _, v in bare.records], set(bare.users[::2]))
    limit_ratio = events_per_s / limit.events_per_s
    say(
        f"write limit (the same kind of rows, bare: COPY, {settings.batch_size:,} records per durable "
        f"commit, no Kafka, no parsing): {limit.records:,} records ({limit.notifications:,} notifications, "
        f"{limit.deliveries:,} delivery rows) in {limit.seconds:.2f} s = "
        f"{limit.events_per_s:,.0f} records/s; herald is {limit_ratio:.2f} of it"
    )

    with connect(url) as conn:
        baseline = run_baseline(conn, settings, [v for _, v in sample.records])
    base_rate = baseline.events / baseline.seconds
    say(
        f"baseline (seed design: one transaction per event; values read from a Python list, not "
        f"Kafka): {baseline.events:,} events in {baseline.seconds:.2f} s = {base_rate:,.0f} events/s; "
        f"per event {1000 * baseline.seconds / baseline.events:.2f} ms, of which COMMIT "
        f"{1000 * baseline.commit_seconds / baseline.events:.2f} ms"
    )
    ratio = events_per_s / base_rate
    say(f"ratio: {ratio:.1f}x")

    problems = verify(url, work, baseline, sample, bare)
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
        "events_per_s": round(events_per_s, 1),
        "limit_events_per_s": round(limit.events_per_s, 1),
        "limit_ratio": round(limit_ratio, 4),
        "baseline_events_per_s": round(base_rate, 1),
        "ratio": round(ratio, 4),
        **extra,
        "cpu_us_per_event": cpu,
        "machine": machine,
        "batch_size": settings.batch_size,
        "partitions": settings.topic_partitions,
        "processes": processes,
        "workers": workers,
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
        for family in metrics.loop().batch_seconds.collect():
            for sample in family.samples:
                if sample.labels.get("consumer") != "ingest":
                    continue
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
    settings: Settings,
    group: str,
    positions: Sequence[Position],
    events: int,
    meter: CpuMeter | None = None,
) -> IngestResult:
    """Step 5 of the module docstring, with progress lines on stderr."""
    run = ConsumerThread("ingest", lambda stopper: run_ingest(settings, group=group, stopper=stopper))
    watch = CommitWatch(settings, group, positions)
    before = _Counters.read()
    if meter is not None:
        meter.start()
    run.start()
    launched = run.launched
    try:
        first, end = _follow(run, watch, before, events, launched)
        if meter is not None:
            meter.stop()
    finally:
        run.stop()
        watch.close()
    totals = run.result().handler.totals
    return IngestResult(events, end - first, first - launched, totals)


def measure_ingest_processes(
    settings: Settings,
    group: str,
    topic: str,
    work: Workload,
    processes: int,
    meter: CpuMeter,
    *,
    workers: int = 1,
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
            herald_command(
                "--log-level",
                "WARNING",
                "ingest",
                "--group",
                group,
                *(["--workers", str(workers)] * (workers > 1)),
            ),
            env=env,
        )
        for _ in range(processes)
    ]
    try:
        wait_joined(settings, group, settings.session_timeout_ms / 1000 + 30)
        # The ingest processes (workers included), not this producer.
        meter.start(
            herald=[q.pid for p in procs for q in (psutil.Process(p.pid), *psutil.Process(p.pid).children())]
        )
        started = time.perf_counter()
        positions = produce(settings, topic, work.records)
        watch = CommitWatch(settings, group, positions)
        try:
            _until_committed(
                watch, lambda: all(p.poll() is None for p in procs), started + 120 + len(work.records) / 1000
            )
            meter.stop()
            return time.perf_counter() - started
        finally:
            watch.close()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)


@dataclass
class LatencyResult:
    seconds: float
    totals: BatchOutcome
    p50_ms: float
    p99_ms: float
    max_ms: float
    counted: int  # records after the warm-up
    warmup_max_ms: float


def measure_latency(
    settings: Settings, group: str, topic: str, work: Workload, rate: float, meter: CpuMeter
) -> LatencyResult:
    """``--rate``: ingest joined first, then the records produced at a steady ``rate``; each
    record's delay runs from its timestamp (set when it is produced) to the wall-clock
    moment the transaction that stored its notifications committed."""
    delays: list[tuple[int, float]] = []  # (record time, ms to its commit)

    def committed(prepared: Prepared, at: float) -> None:
        msgs = {id(m): m for m in prepared.origin.values()}.values()
        delays.extend((m.timestamp()[1], at * 1000 - m.timestamp()[1]) for m in msgs)

    run = ConsumerThread(
        "ingest", lambda stopper: run_ingest(settings, group=group, stopper=stopper, on_commit=committed)
    )
    run.start()
    try:
        wait_joined(settings, group, settings.session_timeout_ms / 1000 + 30)
        meter.start()
        started = time.perf_counter()
        positions = produce_steadily(settings, topic, work.records, rate)
        watch = CommitWatch(settings, group, positions)
        try:
            _until_committed(watch, run.alive, time.perf_counter() + 120)
            seconds = time.perf_counter() - started
            meter.stop()
        finally:
            watch.close()
    finally:
        run.stop()
    totals = run.result().handler.totals
    if not delays:
        raise BenchError("no batch committed")
    first = min(t for t, _ in delays)
    warm = sorted(d for t, d in delays if t >= first + WARMUP_MS) or sorted(d for _, d in delays)
    cold = max((d for t, d in delays if t < first + WARMUP_MS), default=0.0)
    return LatencyResult(
        seconds,
        totals,
        _percentile(warm, 0.50),
        _percentile(warm, 0.99),
        round(warm[-1], 1),
        len(warm),
        round(cold, 1),
    )


def _until_committed(watch: CommitWatch, alive: Callable[[], bool], deadline: float) -> None:
    """Until the group has committed past every record; BenchError if ingest stops or the
    ``deadline`` (on the perf_counter clock) passes first."""
    while not watch.done():
        if not alive():
            raise BenchError("ingest stopped before the group committed the last offset")
        if time.perf_counter() > deadline:
            raise BenchError("ingest did not commit every record in time")
        time.sleep(0.05)


def _percentile(ordered: Sequence[float], q: float) -> float:
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


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
        # ``first`` too: the loop observes a batch's duration just after its commit, which the
        # watch may see first.
        if c.records >= events and watch.done() and first is not None:
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


# -- the end state ----------------------------------------------------------------------------


def verify(url: str, work: Workload, baseline: BaselineResult, sample: Workload, bare: Workload) -> list[str]:
    """Exactly one notification per distinct key, the outbox fully drained, and the write
    limit wrote one notification per distinct record of its own workload."""
    problems = []
    with connect(url, autocommit=True) as conn:
        stored = _count(conn, "SELECT count(*) FROM notifications WHERE user_id = ANY(%s)", work.users)
        unpublished = _count(
            conn,
            "SELECT count(*) FROM deliveries WHERE user_id = ANY(%s) AND published_at IS NULL",
            work.users,
        )
        seed_stored = _count(conn, "SELECT count(*) FROM notifications WHERE user_id = ANY(%s)", sample.users)
        bare_stored = _count(conn, "SELECT count(*) FROM notifications WHERE user_id = ANY(%s)", bare.users)
    if stored != work.distinct:
        problems.append(f"ingest stored {stored:,} notifications, expected {work.distinct:,} distinct keys")
    if bare_stored != bare.distinct:
        problems.append(f"the write limit stored {bare_stored:,} notifications, expected {bare.distinct:,}")
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
