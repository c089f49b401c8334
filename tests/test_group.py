"""Two ``herald ingest`` OS processes in one group share the work, exactly and without deadlocks.

The stream overlaps users across all partitions (random record keys), repeats ~10% of its
events (on other partitions, so the two processes race on the same rows), and sends bursts
of criticals to users with email on, so both processes contend for the same rate-limit rows.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from config.settings import Settings
from herald.inspect import wait_committed
from producers.publisher import KafkaPublisher, OutRecord, Position
from producers.topics import Topics
from storage.db import Database
from storage.preferences import set_preferences
from tests.helpers import event, expected_key, last_offsets, produce

if TYPE_CHECKING:
    from tests.conftest import Backend

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4
DISTINCT = 1800
DUPLICATES = 200
MINUTES = [datetime(2030, 3, 1, 12, m, tzinfo=UTC) for m in range(3)]
STOPPED = re.compile(r"ingest stopped: (\d+) records, (\d+) inserted, (\d+) duplicate, (\d+) invalid")
ASSIGN = re.compile(r"ingest: (assigned|revoked) (.*)$")


def stream(rng: random.Random, topic: str, users: list[str], email_users: list[str]) -> list[dict[str, Any]]:
    """DISTINCT distinct notifications (some as two events sharing a resource id), then duplicates."""
    out: list[dict[str, Any]] = []
    while len(out) < DISTINCT:
        dice = rng.random()
        if dice < 0.25:
            # a burst critical for an email user: contends for one of a few rate-limit rows
            minute = rng.choice(MINUTES)
            e = event(
                user_id=rng.choice(email_users),
                severity="critical",
                occurred_at=(minute + timedelta(seconds=rng.randrange(60))).isoformat(),
            )
        elif dice < 0.30:
            e = event(user_id=rng.choice(email_users), severity="warning")
        else:
            others = [u for u in users if u not in email_users]
            severity = rng.choice(["info", "success", "warning", "critical"])
            e = event(user_id=rng.choice(others), severity=severity)
        if rng.random() < 0.05:
            e["resource_id"] = f"inv-{uuid.uuid4().hex[:8]}"
            out.append(e)
            out.append({**e, "id": f"evt-{uuid.uuid4().hex[:12]}"})  # the same invoice failing twice
        else:
            out.append(e)
    out += [dict(rng.choice(out)) for _ in range(DUPLICATES)]
    rng.shuffle(out)
    return out


def dedupe_key(e: dict[str, Any], topic: str) -> tuple[str, str]:
    return e["user_id"], expected_key(e)  # the source defaults to a stable name, not the topic


def start(settings: Settings, group: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update(
        {
            "HERALD_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "HERALD_DATABASE_URL": settings.database_url.get_secret_value(),
            "HERALD_TOPIC_PREFIX": settings.topic_prefix,
            "HERALD_TOPIC_PARTITIONS": str(PARTITIONS),
            "HERALD_SESSION_TIMEOUT_MS": "6000",
            "HERALD_METRICS_PORT": "-1",
            # small batches: many short transactions from both processes interleave
            "HERALD_BATCH_SIZE": "100",
            "HERALD_BATCH_TIME_MS": "100",
        }
    )
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "herald.cli", "ingest", "--group", group],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def last_assignment(log: Path) -> set[str] | None:
    """The partitions a process owns now, from its last assign/revoke line (None: not yet)."""
    state: set[str] | None = None
    for line in log.read_text(errors="replace").splitlines():
        m = ASSIGN.search(line)
        if m:
            owned = set() if m.group(2) == "nothing" else set(m.group(2).split(", "))
            state = owned if m.group(1) == "assigned" else set()
    return state


def wait_balanced(procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout: float = 60.0) -> None:
    """Until both processes own a non-empty, disjoint share of every partition."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs, strict=True):
            assert p.poll() is None, f"ingest exited early ({p.returncode}): {log.read_text()[-3000:]}"
        owned = [last_assignment(log) or set() for log in logs]
        if all(owned) and len(set().union(*owned)) == PARTITIONS and sum(map(len, owned)) == PARTITIONS:
            return
        time.sleep(0.2)
    raise TimeoutError(f"group never balanced: {[last_assignment(log) for log in logs]}")


def produce_keyed(settings: Settings, values: list[dict[str, Any]], rng: random.Random) -> list[Position]:
    topic = Topics(settings.topic_prefix).events
    pub = KafkaPublisher(settings)
    try:
        return pub.publish(
            [
                OutRecord(
                    topic=topic, key=uuid.UUID(int=rng.getrandbits(128)).bytes, value=json.dumps(v).encode()
                )
                for v in values
            ]
        )
    finally:
        pub.close()


def test_two_processes_in_one_group(backend: Backend, tmp_path: Path) -> None:
    rng = random.Random(20300301)
    settings = Settings(
        kafka_bootstrap=backend.bootstrap,
        database_url=backend.database_url,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}",
        session_timeout_ms=6000,
        metrics_port=-1,
    ).model_copy(update={"topic_partitions": PARTITIONS})
    topic = Topics(settings.topic_prefix).events
    tag = uuid.uuid4().hex[:6]
    users = [f"grp-{tag}-{i}" for i in range(40)]
    email_users = users[:8]
    db = Database(backend.database_url)
    try:
        for u in email_users:
            set_preferences(db, u, {"email": True})
    finally:
        db.close()
    events = stream(rng, topic, users, email_users)
    # create the topics with 4 partitions (and give each partition a first, harmless record)
    warmup = produce(settings, [event(user_id=f"grp-{tag}-warmup", id=f"w{i}") for i in range(8)])

    group = f"g-{uuid.uuid4().hex[:8]}"
    logs = [tmp_path / "ingest-a.log", tmp_path / "ingest-b.log"]
    procs = [start(settings, group, log) for log in logs]
    try:
        wait_balanced(procs, logs)
        positions = warmup + produce_keyed(settings, events, rng)
        assert len({p for _, p, _ in positions}) == PARTITIONS
        wait_committed(settings, group, last_offsets(positions), timeout=120)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=30) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], texts
    for text in texts:
        assert "deadlock" not in text.lower(), text
        assert "Traceback" not in text, text

    # each process did part of the work; together they inserted every notification exactly once
    keys = {dedupe_key(e, topic) for e in events}
    totals = [STOPPED.search(t) for t in texts]
    assert all(totals), texts
    inserted = [int(m.group(2)) for m in totals if m]
    records = [int(m.group(1)) for m in totals if m]
    assert all(n > 0 for n in records), records
    assert sum(inserted) == len(keys) + len(warmup)

    expected_deliveries = expected(events, topic, set(email_users))
    with psycopg.connect(backend.database_url, autocommit=True) as conn:
        count = conn.execute(
            "SELECT count(*) FROM notifications WHERE user_id LIKE %s", (f"grp-{tag}-%",)
        ).fetchone()
        assert count is not None and count[0] == len(keys) + len(warmup)
        stored = conn.execute(
            "SELECT user_id, idempotency_key FROM notifications WHERE user_id = ANY(%s)", (users,)
        ).fetchall()
        assert {(str(u), str(k)) for u, k in stored} == keys
        got = Counter(
            (str(u), str(route), str(reason or ""), m)
            for u, route, reason, m in conn.execute(
                # a warning's minute is its record time: not part of the expectation
                "SELECT d.user_id, d.route, d.reason, CASE WHEN d.reason = 'warning' THEN NULL"
                " ELSE date_trunc('minute', n.occurred_at) END"
                " FROM deliveries d JOIN notifications n ON n.id = d.notification_id"
                " WHERE d.user_id = ANY(%s)",
                (users,),
            ).fetchall()
        )
        unpublished = conn.execute(
            "SELECT count(*) FROM deliveries WHERE user_id = ANY(%s) AND published_at IS NULL", (users,)
        ).fetchone()
        rate = {
            (str(u), w): int(str(c))
            for u, w, c in conn.execute(
                "SELECT user_id, window_start, count FROM rate_limits"
                " WHERE user_id = ANY(%s) AND channel = 'email'",
                (users,),
            ).fetchall()
        }
    assert got == expected_deliveries.deliveries
    assert unpublished == (0,)
    assert rate == expected_deliveries.rate_counts
    assert max(expected_deliveries.rate_counts.values()) > 5  # the test did exercise the limit


class Expected:
    def __init__(self) -> None:
        self.deliveries: Counter[tuple[str, str, str, object]] = Counter()
        self.rate_counts: dict[tuple[str, datetime], int] = {}


def expected(events: list[dict[str, Any]], topic: str, email_users: set[str]) -> Expected:
    """Email deliveries per (user, route, reason, minute): the first 5 criticals per minute go now."""
    out = Expected()
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for e in events:
        seen.setdefault(dedupe_key(e, topic), e)
    criticals: Counter[tuple[str, datetime]] = Counter()
    for e in seen.values():
        if e["user_id"] not in email_users:
            continue
        if e["severity"] == "warning":
            out.deliveries[(e["user_id"], "digest", "warning", None)] += 1
        elif e["severity"] == "critical":
            if "occurred_at" not in e:
                raise AssertionError("every critical for an email user carries occurred_at")
            at = datetime.fromisoformat(e["occurred_at"]).replace(second=0)
            criticals[(e["user_id"], at)] += 1
    for (user, minute), n in criticals.items():
        out.deliveries[(user, "immediate", "", minute)] += min(n, 5)
        if n > 5:
            out.deliveries[(user, "digest", "rate_limited", minute)] += n - 5
        out.rate_counts[(user, minute)] = n
    return out
