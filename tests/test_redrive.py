"""``herald dlq`` and ``herald redrive``: by reason, never twice (a SIGKILL mid-run
included), a fixed permanent failure delivered once, an exhausted one with its whole
budget again, a sent one never again, and a dropped value skipped."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

import consumers.redrive as redrive_mod
from config.settings import Settings
from consumers.redrive import H_FROM, Redrive
from herald.inspect import Record, read_topic
from producers.topics import Topics, ensure_topics
from storage.db import Database
from tests.conftest import Backend
from tests.helpers import ROOT, ingest, produce
from tests.ops_support import cli_env, run
from tests.test_deliver import (
    critical,
    deliver_settings,
    peer,
    rows,
    send_events,
    start_deliver,
    user_with,
    wait_until,
)
from tests.webhook_peer import WebhookPeer

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]
__all__ = ["peer"]  # the fixture, used by name


def dead_letters(settings: Settings, dlq: str, n: int, reason: str = "schema", **extra: bytes) -> None:
    """``n`` dead letters as ingest writes them (Spring headers), produced in bulk."""
    topics = Topics(settings.topic_prefix)
    p = Producer({**settings.kafka_client_config(), "linger.ms": 5})
    for i in range(n):
        headers = [
            ("kafka_dlt-original-topic", topics.events.encode()),
            ("kafka_dlt-original-partition", struct.pack(">i", 0)),
            ("kafka_dlt-original-offset", struct.pack(">q", i)),
            ("kafka_dlt-original-timestamp", struct.pack(">q", 1_795_000_000_000)),
            ("kafka_dlt-exception-fqcn", b"core.errors.InvalidEvent"),
            ("kafka_dlt-exception-message", b"title: field required"),
            ("herald-dlt-reason", reason.encode()),
            *extra.items(),
        ]
        value = None if extra.get("herald-dlt-value-dropped") else json.dumps({"id": f"dl-{i}"}).encode()
        p.produce(dlq, value=value, key=f"k{i}".encode(), headers=headers)
    assert p.flush(30) == 0


def tags(settings: Settings, topic: str) -> Counter[bytes]:
    return Counter(r.headers[H_FROM] for r in read_topic(settings, topic, timeout=30) if H_FROM in r.headers)


def taken(db: Conn, dlq: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT status, count(*) FROM redrives WHERE dlq_topic = %s GROUP BY 1 ORDER BY 1", (dlq,)
    ).fetchall()


def test_list_show_and_redrive_by_reason(db: Conn, settings: Settings) -> None:
    topics = Topics(settings.topic_prefix)
    bad = [b"not json", b"{nope", {"id": "s1", "type": "t"}, {"id": "s2", "type": "t"}]
    ingest(settings, produce(settings, bad))
    dead_letters(settings, topics.events_dlq, 1, reason="too_large", **{"herald-dlt-value-dropped": b"true"})
    dlq = topics.events_dlq

    listed = run(settings, "dlq", "list", dlq)
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert f"{dlq}: 5 dead letter(s) (1 with the value dropped: not redrivable)" in out
    assert {tuple(line.split()) for line in out.splitlines()} >= {
        ("not_json", "2"),
        ("schema", "2"),
        ("too_large", "1"),
        (topics.events, "5"),
    }
    assert "oldest: " in out and "newest: " in out

    dry = run(settings, "redrive", "--dlq", dlq, "--where", "reason=schema", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "2 dead letter(s) to move" in dry.stdout and dry.stdout.count("would move") == 2
    dry_all = run(settings, "redrive", "--dlq", dlq, "--dry-run")
    assert "4 dead letter(s) to move" in dry_all.stdout
    assert "skipped, value dropped (cannot be redriven): 1" in dry_all.stdout
    assert "  value_dropped [0]@4 ->" in dry_all.stdout or "value_dropped" in dry_all.stdout
    assert tags(settings, topics.events) == Counter() and taken(db, dlq) == []
    declined = run(settings, "redrive", "--dlq", dlq, "--where", "reason=schema", stdin="")
    assert declined.returncode == 1 and "nothing changed" in declined.stdout and taken(db, dlq) == []

    moved = run(settings, "redrive", "--dlq", dlq, "--where", "reason=schema", "--yes")
    assert moved.returncode == 0, moved.stderr
    assert "moved 2; already sent (not moved) 0" in moved.stdout
    assert moved.stdout.count(f"-> {topics.events}  (schema)") == 2
    back = [r for r in read_topic(settings, topics.events, timeout=20) if H_FROM in r.headers]
    assert len(back) == 2
    assert all(not any(k.startswith(("kafka_dlt", "herald-dlt")) for k in r.headers) for r in back)
    assert sorted(json.loads(r.value or b"")["id"] for r in back) == ["s1", "s2"]
    assert taken(db, dlq) == [("moved", 2)], "the dropped one is listed and skipped, not recorded"

    again = run(settings, "redrive", "--dlq", dlq, "--where", "reason=schema", "--yes")
    assert "0 dead letter(s) to move; 2 taken by earlier redrives" in again.stdout
    first = run(settings, "redrive", "--dlq", dlq, "--where", "reason=not_json", "--limit", "1", "--yes")
    assert "moved 1;" in first.stdout
    rest = run(settings, "redrive", "--dlq", dlq, "--yes")
    assert "moved 1;" in rest.stdout, "what the filter and --limit left stayed available"
    assert set(tags(settings, topics.events).values()) == {1} and len(tags(settings, topics.events)) == 4

    bad_where = run(settings, "redrive", "--dlq", dlq, "--where", "colour=red")
    unknown = run(settings, "redrive", "--dlq", "no.such.dlq", "--yes")
    for done in (bad_where, unknown):
        assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr


def test_sigkill_in_the_middle_of_a_redrive_moves_nothing_twice(db: Conn, settings: Settings) -> None:
    topics = Topics(settings.topic_prefix)
    dlq = topics.events_dlq
    ensure_topics(settings, topics.ingest_topics())
    dead_letters(settings, dlq, 1000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "herald.cli", "redrive", "--dlq", dlq, "--yes", "--chunk", "5"],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("HERALD_")},
            **cli_env(settings),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while sum(n for _, n in taken(db, dlq)) < 100:
            assert proc.poll() is None and time.monotonic() < deadline, "the redrive ended before the kill"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = sum(n for _, n in taken(db, dlq))
    assert 100 <= at_kill < 1000, "killed in the middle"

    finish = run(settings, "redrive", "--dlq", dlq, "--yes")
    assert finish.returncode == 0, finish.stderr
    moved = tags(settings, topics.events)
    assert len(moved) == 1000 and set(moved.values()) == {1}, "every record moved, none twice"
    assert taken(db, dlq) == [("moved", 1000)]


def test_a_crash_between_produce_and_record_is_found_not_moved_again(
    db: Conn, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics(settings.topic_prefix)
    dlq = topics.events_dlq
    ensure_topics(settings, topics.ingest_topics())
    dead_letters(settings, dlq, 6)

    class Crash(Exception):
        pass

    def crash(*args: object, **kwargs: object) -> None:
        raise Crash

    d = Database.from_settings(settings)
    try:
        rd = Redrive(settings, d, dlq, chunk=3)
        records, _ = rd.plan({}, None)
        # 1. produced, but the crash comes before the rows say moved.
        monkeypatch.setattr(redrive_mod.store, "mark", crash)
        with pytest.raises(Crash):
            rd.run(records[:3])
        monkeypatch.undo()
        # 2. taken, but the crash comes before the broker has the records.
        monkeypatch.setattr(redrive_mod.KafkaPublisher, "publish", crash)
        with pytest.raises(Crash):
            rd.run(records[3:])
        monkeypatch.undo()
    finally:
        d.close()
    assert taken(db, dlq) == [("pending", 6)] and len(tags(settings, topics.events)) == 3

    # While another redrive of this DLQ runs (it holds the lock), a second one is refused:
    # it would take the first one's pending rows for a crashed run's.
    with psycopg.connect(settings.database_url.get_secret_value(), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtextextended('herald-redrive:' || %s, 0))", (dlq,))
        busy = run(settings, "redrive", "--dlq", dlq, "--yes")
    assert busy.returncode == 1 and f"another herald redrive of {dlq} is running" in busy.stderr
    assert taken(db, dlq) == [("pending", 6)]

    finish = run(settings, "redrive", "--dlq", dlq, "--yes")
    assert finish.returncode == 0, finish.stderr
    assert "finished 6 record(s) a stopped redrive had taken:" in finish.stdout
    assert finish.stdout.count("  found ") == 3 and finish.stdout.count("  moved ") == 3
    moved = tags(settings, topics.events)
    assert len(moved) == 6 and set(moved.values()) == {1}
    assert taken(db, dlq) == [("moved", 6)]


def _dlq_records(settings: Settings) -> list[Record]:
    return read_topic(settings, Topics(settings.topic_prefix).deliveries_dlq("webhook"), timeout=10)


def test_a_fixed_permanent_failure_is_delivered_once_and_a_sent_one_never_again(
    db: Conn, backend: Backend, peer: WebhookPeer
) -> None:
    s = deliver_settings(backend)
    dlq = Topics(s.topic_prefix).deliveries_dlq("webhook")
    user_with(db, s, "perm", peer.url("/status/422"))
    send_events(s, critical("perm"))
    deliver = start_deliver(s)
    try:
        wait_until(lambda: [r["status"] for r in rows(db, "perm")] == ["failed"], what="failed")
        (dead,) = _dlq_records(s)
        (row,) = rows(db, "perm")

        shown = run(s, "dlq", "show", dlq, "--partition", str(dead.partition), "--offset", str(dead.offset))
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        h = doc["headers"]
        assert (doc["reason"], h["herald-dlt-reason"], h["retry_topic-attempts"]) == (
            "permanent",
            "permanent",
            1,
        )
        assert isinstance(h["kafka_dlt-original-partition"], int) and isinstance(
            h["kafka_dlt-original-offset"], int
        )
        assert h["kafka_dlt-original-timestamp"] > 1_700_000_000_000
        assert h["kafka_dlt-exception-message"] == "HTTP 422" and h["herald-delivery-id"] == str(row["id"])
        assert "payload" not in doc
        with_payload = json.loads(
            run(
                s,
                "dlq",
                "show",
                dlq,
                "--partition",
                str(dead.partition),
                "--offset",
                str(dead.offset),
                "--payload",
            ).stdout
        )
        assert with_payload["payload"]["delivery_id"] == str(row["id"])
        missing = run(s, "dlq", "show", dlq, "--partition", str(dead.partition), "--offset", "999")
        assert missing.returncode == 2 and "no record at" in missing.stderr

        # The operator fixes the endpoint, then redrives.
        db.execute("UPDATE channel_endpoints SET address = %s WHERE user_id = 'perm'", (peer.url("/ok"),))
        moved = run(s, "redrive", "--dlq", dlq, "--yes")
        assert "moved 1;" in moved.stdout and f"delivery {row['id']}" in moved.stdout, moved.stdout
        wait_until(lambda: [r["status"] for r in rows(db, "perm")] == ["sent"], what="sent")
        assert peer.ids("/ok") == Counter({str(row["id"]): 1})

        # A copy of the dead letter turns up again: the delivery was sent, it is not moved.
        p = Producer(s.kafka_client_config())
        p.produce(dlq, value=dead.value, key=dead.key, headers=list(dead.headers.items()))
        assert p.flush(10) == 0
        again = run(s, "redrive", "--dlq", dlq, "--yes")
        assert "moved 0; already sent (not moved) 1" in again.stdout, again.stdout
        time.sleep(1.5)
    finally:
        deliver.stop()
    assert peer.ids("/ok") == Counter({str(row["id"]): 1}), "delivered once"
    tries = db.execute(
        "SELECT attempt, outcome, status_code FROM delivery_attempts WHERE delivery_id = %s ORDER BY 1",
        (row["id"],),
    ).fetchall()
    assert tries == [(1, "permanent", 422), (2, "ok", 200)], "history kept"


def test_a_redriven_exhausted_delivery_gets_its_whole_budget_again(
    db: Conn, backend: Backend, peer: WebhookPeer
) -> None:
    s = deliver_settings(backend, delivery={"retry_tiers": ["1s"], "max_attempts": 2, "lease_s": 10})
    dlq = Topics(s.topic_prefix).deliveries_dlq("webhook")
    user_with(db, s, "tired", peer.url("/switch"))
    peer.down.set()
    send_events(s, critical("tired"))

    def state() -> tuple[str, int]:
        (r,) = rows(db, "tired")
        return r["status"], r["attempts"]

    deliver = start_deliver(s)
    try:
        wait_until(lambda: state() == ("failed", 2), what="exhausted after 2")
        assert run(s, "redrive", "--dlq", dlq, "--yes").returncode == 0
        wait_until(lambda: state() == ("failed", 4), what="exhausted again after 2 more")
        assert len(peer.at("/switch")) == 4
        assert [r["status_reason"] for r in rows(db, "tired")] == ["exhausted"]
        assert len(_dlq_records(s)) == 2
        peer.down.clear()
        second = run(s, "redrive", "--dlq", dlq, "--yes")
        assert "moved 1;" in second.stdout, "only the new dead letter: the first was moved already"
        wait_until(lambda: state() == ("sent", 5), what="sent at the fifth try")
    finally:
        deliver.stop()
    calls = peer.at("/switch")
    assert [c.answered for c in calls] == [503, 503, 503, 503, 200]
    assert len({c.headers["webhook-id"] for c in calls}) == 1
