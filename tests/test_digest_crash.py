"""Digests under kill -9: ``herald digest`` is SIGKILLed at random moments while warnings
flow, restarted each time, and every window still gives exactly one digest with the right
item count; no item is lost or counted twice.

Set HERALD_CRASH_SEED to replay a run's kill moments.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from herald.inspect import read_topic, wait_group_stable
from producers.topics import Topics
from tests.conftest import Backend
from tests.faults import HeraldProcess
from tests.helpers import event, make_settings, produce, start_ingest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Conn = psycopg.Connection[tuple[object, ...]]
KILLS = 5
FLOW_S = 9.0
USERS = ("u1", "u2", "u3", "u4")
KEYS = ("build", None)


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
    proc = HeraldProcess(
        s,
        f"dg-{uuid.uuid4().hex[:8]}",
        tmp_path,
        command=("digest",),
        name="digest",
        HERALD_SESSION_TIMEOUT_MS="3000",
        HERALD_BATCH_SIZE="20",
        HERALD_BATCH_TIME_MS="50",
        HERALD_POLICY__DIGEST_SECONDS="2",
        HERALD_POLICY__WEBHOOK="true",
        HERALD_DIGEST__GRACE_S="1",
        HERALD_DIGEST__TICK_S="0.1",
        HERALD_OUTBOX_RELAY_AFTER_S="1",
        HERALD_OUTBOX_RELAY_EVERY_S="0.5",
    )
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
            assert proc.kill(), "digest died by itself"
            proc.start()
        flowing.join(FLOW_S + 30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _settled(db, sent[0]):
            time.sleep(0.2)
        assert proc.terminate(30) == 0
    finally:
        stop_flow.set()
        ing.stop()
        proc.cleanup()
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
