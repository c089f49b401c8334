"""Digests under kill -9: ``herald digest`` is SIGKILLed at random moments while warnings
flow, restarted each time, and every window still gives exactly one digest with the right
item count; no item is lost or counted twice.

Set HERALD_CRASH_SEED to replay a run's kill moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from config.settings import Settings
from herald.inspect import read_topic, wait_group_stable
from producers.topics import Topics
from tests.conftest import Backend
from tests.helpers import ROOT, event, make_settings, produce, start_ingest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Conn = psycopg.Connection[tuple[object, ...]]
KILLS = 5
FLOW_S = 9.0
USERS = ("u1", "u2", "u3", "u4")
KEYS = ("build", None)


class DigestProcess:
    """``herald digest`` as an OS process, restartable, each run logging to its own file."""

    def __init__(self, settings: Settings, group: str, log_dir: Path) -> None:
        self.group = group
        self.log_dir = log_dir
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        base = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        self.env = {
            **base,
            "HERALD_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "HERALD_DATABASE_URL": settings.database_url.get_secret_value(),
            "HERALD_TOPIC_PREFIX": settings.topic_prefix,
            "HERALD_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "HERALD_SESSION_TIMEOUT_MS": "3000",
            "HERALD_BATCH_SIZE": "20",
            "HERALD_BATCH_TIME_MS": "50",
            "HERALD_METRICS_PORT": "-1",
            "HERALD_POLICY__DIGEST_SECONDS": "2",
            "HERALD_POLICY__WEBHOOK": "true",
            "HERALD_DIGEST__GRACE_S": "1",
            "HERALD_DIGEST__TICK_S": "0.1",
            "HERALD_OUTBOX_RELAY_AFTER_S": "1",
            "HERALD_OUTBOX_RELAY_EVERY_S": "0.5",
            "HERALD_DB_BACKOFF_MIN_MS": "100",
            "HERALD_DB_BACKOFF_MAX_MS": "1000",
        }

    def start(self) -> None:
        self.runs += 1
        with open(self.log_dir / f"digest-{self.runs}.log", "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "herald.cli", "digest", "--group", self.group],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "digest died by itself"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def test_sigkill_at_random_moments_gives_one_digest_per_window(
    db: Conn, backend: Backend, tmp_path: Path
) -> None:
    seed = int(os.environ.get("HERALD_CRASH_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    print(f"HERALD_CRASH_SEED={seed}")
    s = make_settings(
        backend.bootstrap,
        backend.database_url,
        policy={"webhook": True, "digest_seconds": 2},
        session_timeout_ms=3000,
    )
    ing = start_ingest(s)
    proc = DigestProcess(s, f"dg-{uuid.uuid4().hex[:8]}", tmp_path)
    sent: list[int] = [0]
    stop_flow = threading.Event()

    def flow() -> None:
        """Bursts of warnings for every user and batch key, event time now, for FLOW_S seconds."""
        end = time.monotonic() + FLOW_S
        while time.monotonic() < end and not stop_flow.is_set():
            now = datetime.now(UTC).isoformat()
            burst = [
                event(
                    user_id=u,
                    severity="warning",
                    title=f"{u} {k} {sent[0] + i}",
                    batch_key=k,
                    occurred_at=now,
                )
                for i, (u, k) in enumerate((u, k) for u in USERS for k in KEYS)
            ]
            produce(s, burst)
            sent[0] += len(burst)
            time.sleep(0.05)

    try:
        wait_group_stable(s, ing.group, 30)
        proc.start()
        flowing = threading.Thread(target=flow, daemon=True)
        flowing.start()
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.8, 2.0))
            proc.kill()
            proc.start()
        flowing.join(FLOW_S + 30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _settled(db, sent[0]):
            time.sleep(0.2)
        assert proc.stop() == 0
    finally:
        stop_flow.set()
        ing.stop()
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
    # Every warning is one item, in exactly one window, and every window closed.
    items = db.execute("SELECT count(*), count(DISTINCT delivery_id) FROM digest_items").fetchone()
    assert items == (sent[0], sent[0]), f"seed {seed}"
    rows = db.execute(
        "SELECT w.id::text, w.status, w.item_count,"
        " (SELECT count(*) FROM digest_items i WHERE i.window_id = w.id) FROM digest_windows w"
    ).fetchall()
    assert all(status == "sent" for _, status, _, _ in rows), f"seed {seed}: {rows}"
    assert all(count == linked for _, _, count, linked in rows), f"seed {seed}: counted twice"
    # Exactly one digest per window: records of one id are copies (same bytes), counts right.
    records: dict[str, set[bytes]] = defaultdict(set)
    for r in read_topic(s, Topics(s.topic_prefix).deliveries("webhook")):
        if json.loads(r.value or b"").get("type") == "digest":
            records[json.loads(r.value or b"")["delivery_id"]].add(r.value or b"")
    expected = {wid: count for wid, _, count, _ in rows}
    assert set(records) == set(expected), f"seed {seed}"
    for wid, copies in records.items():
        assert len(copies) == 1, f"seed {seed}: two different digests for window {wid}"
        assert json.loads(next(iter(copies)))["count"] == expected[wid]
    statuses = db.execute(
        "SELECT status, count(*) FROM deliveries WHERE notification_id IS NOT NULL GROUP BY status"
    ).fetchall()
    assert dict(statuses) == {"digested": sent[0]}, f"seed {seed}"
    assert proc.runs == KILLS + 1


def _settled(db: Conn, sent: int) -> bool:
    """Every item in, every window closed, every digest row published."""
    row = db.execute(
        "SELECT (SELECT count(*) FROM digest_items),"
        " (SELECT count(*) FROM digest_windows WHERE status = 'open'),"
        " (SELECT count(*) FROM deliveries d JOIN digest_windows w ON w.id = d.id"
        "  WHERE d.published_at IS NULL)"
    ).fetchone()
    return row == (sent, 0, 0)
