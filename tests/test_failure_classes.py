"""Each class of PostgreSQL failure, against the real database, with the DLQ and offsets checked.

- the record's fault (22, 23, 54): that record is dead-lettered (reason ``rejected``), its
  batch mates are stored, found by bisecting the batch;
- the environment (a missing table, a read-only server): never dead-lettered; the batch
  is retried with an alarm (an ERROR line saying what to do, ``herald_environment_errors``)
  and lands once the environment is fixed;
- neither moves ``herald_db_unavailable_total``, which is for outages only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import psycopg
import pytest
from prometheus_client import REGISTRY

from config.settings import Settings
from consumers.dlq import decode_headers
from consumers.ingest import IngestHandler
from core.errors import DatabaseMisconfigured, DatabaseUnavailable, RecordRejected
from herald.inspect import committed, read_topic, wait_committed
from producers.publisher import OutRecord, Position
from producers.topics import Topics
from storage.db import Database, classify
from tests.helpers import event, ingest, last_offsets, produce, start_ingest

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _titles(db: Conn) -> set[str]:
    return {str(r[0]) for r in db.execute("SELECT title FROM notifications").fetchall()}


class CountingDatabase(Database):
    """The real database, counting the transactions a batch takes."""

    transactions = 0

    def transaction(self):  # type: ignore[no-untyped-def]
        self.transactions += 1
        return super().transaction()


class KeepPublisher:
    def __init__(self) -> None:
        self.records: list[OutRecord] = []

    def publish(self, records: Sequence[OutRecord]) -> list[Position]:
        self.records += records
        return []

    def close(self) -> None:
        pass


def test_refused_records_are_found_by_bisection_not_one_by_one(
    settings: Settings, db: Conn, refuse_evil: None
) -> None:
    """64 records, 2 refused: about 2·log2(64) transactions per culprit, not 64."""
    values = [event(title=f"fine {i}") for i in range(64)]
    values[17] = event(title="evil one")
    values[50] = event(title="evil two")
    positions = produce(settings, values, key=b"one-partition")
    from confluent_kafka import Consumer

    consumer = Consumer(
        {**settings.kafka_client_config(), "group.id": "peek", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([Topics(settings.topic_prefix).events])
    messages = []
    deadline = time.monotonic() + 30
    while len(messages) < len(positions) and time.monotonic() < deadline:
        messages += [m for m in consumer.consume(100, timeout=1) if m.error() is None]
    consumer.close()
    assert len(messages) == 64

    database = CountingDatabase(settings.database_url.get_secret_value())
    publisher = KeepPublisher()
    handler = IngestHandler(settings, database, publisher, Topics(settings.topic_prefix))
    before = _metric("herald_db_unavailable_total", consumer="ingest")
    handler.apply(handler.prepare(messages))
    database.close()

    assert _titles(db) == {f"fine {i}" for i in range(64) if i not in (17, 50)}
    dead = [r for r in publisher.records if r.reason is not None]
    assert sorted(decode_headers(dict(r.headers))["kafka_dlt-original-offset"] for r in dead) == [
        messages[17].offset(),
        messages[50].offset(),
    ]
    assert all(r.reason == "rejected" for r in dead)
    # 1 whole batch + at most 2·log2(64) per culprit + the mark-published step.
    assert database.transactions <= 1 + 2 * 2 * 6 + 1, database.transactions
    assert _metric("herald_db_unavailable_total", consumer="ingest") == before


def test_a_missing_table_is_never_dead_lettered_and_lands_once_migrated(
    settings: Settings, db: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    positions = produce(settings, [event(title=f"wait {i}") for i in range(5)], key=b"k")
    before_env = _metric("herald_environment_errors_total", consumer="ingest", system="database")
    before_outage = _metric("herald_db_unavailable_total", consumer="ingest")
    db.execute("ALTER TABLE notifications RENAME TO notifications_away")
    try:
        caplog.set_level(logging.ERROR, logger="consumers.loop")
        runner = start_ingest(settings)
        deadline = time.monotonic() + 30
        while (
            _metric("herald_environment_errors_total", consumer="ingest", system="database") < before_env + 2
        ):
            assert time.monotonic() < deadline, "no environment alarm"
            time.sleep(0.1)
        partition = positions[0][1]
        got = committed(settings, runner.group, [(positions[0][0], partition)])
        assert all(off < 0 for off in got.values()), got  # nothing committed
    finally:
        db.execute("ALTER TABLE notifications_away RENAME TO notifications")
    wait_committed(settings, runner.group, last_offsets(positions), timeout=60)
    runner.stop()
    assert _titles(db) == {f"wait {i}" for i in range(5)}
    assert read_topic(settings, Topics(settings.topic_prefix).events_dlq, timeout=2) == []
    assert _metric("herald_db_unavailable_total", consumer="ingest") == before_outage
    alarms = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("herald migrate" in line for line in alarms), alarms


def test_a_read_only_server_is_an_alarm_not_a_dead_letter(settings: Settings, db: Conn) -> None:
    """25006 after a failover to a standby: retried with an alarm; lands once writable."""
    name = str(db.execute("SELECT current_database()").fetchone()[0])  # type: ignore[index]
    positions = produce(settings, [event(title="after failover")])
    before = _metric("herald_environment_errors_total", consumer="ingest", system="database")
    db.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    try:
        runner = start_ingest(settings)
        deadline = time.monotonic() + 30
        while _metric("herald_environment_errors_total", consumer="ingest", system="database") < before + 1:
            assert time.monotonic() < deadline, "no environment alarm"
            time.sleep(0.1)
    finally:
        db.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
    # The failed connection was dropped: the next one is writable.
    wait_committed(settings, runner.group, last_offsets(positions), timeout=60)
    runner.stop()
    assert _titles(db) == {"after failover"}
    assert read_topic(settings, Topics(settings.topic_prefix).events_dlq, timeout=2) == []


def test_each_sqlstate_class_maps_to_its_family(db: Conn) -> None:
    """The real server's errors, classified in one place."""
    cases = {
        "SELECT 1/0": RecordRejected,  # 22012
        "SELECT 'x'::int": RecordRejected,  # 22P02
        "SELECT * FROM no_such_table": DatabaseMisconfigured,  # 42P01
        "SELECT no_such_column FROM notifications": DatabaseMisconfigured,  # 42703
        "SELECT pg_sleep(2)": DatabaseUnavailable,  # 57014 under a statement timeout
    }
    # psycopg refuses a NUL in a text value itself, with no SQLSTATE: still the record's fault.
    with pytest.raises(psycopg.DataError) as client_side:
        db.execute("SELECT %s::text", ("a\x00b",))
    assert client_side.value.sqlstate is None
    assert isinstance(classify(client_side.value), RecordRejected)
    db.execute("SET statement_timeout = 200")
    try:
        for sql, family in cases.items():
            with pytest.raises(psycopg.Error) as info:
                db.execute(sql)
            assert isinstance(classify(info.value), family), sql
    finally:
        db.execute("RESET statement_timeout")


def test_sessions_carry_timeouts_and_keepalives(settings: Settings) -> None:
    s = settings.model_copy(
        update={"db_statement_timeout_ms": 1234, "db_idle_in_transaction_timeout_ms": 5678}
    )
    database = Database.from_settings(s)
    try:
        with database.transaction() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone() == ("1234ms",)
            cur.execute("SHOW idle_in_transaction_session_timeout")
            assert cur.fetchone() == ("5678ms",)
        info = database.connection().info.get_parameters()
        assert info.get("keepalives") == "1"
    finally:
        database.close()


def test_an_ingest_run_with_a_refused_record_among_good_ones(
    settings: Settings, db: Conn, refuse_evil: None
) -> None:
    before = _metric("herald_db_unavailable_total", consumer="ingest")
    good = [event(title=f"ok {i}") for i in range(6)]
    positions = produce(settings, [*good[:3], event(title="evil"), *good[3:]], key=b"p")
    ingest(settings, positions)
    assert _titles(db) == {f"ok {i}" for i in range(6)}
    dead = read_topic(settings, Topics(settings.topic_prefix).events_dlq)
    assert [decode_headers(d.headers)["herald-dlt-reason"] for d in dead] == ["rejected"]
    assert _metric("herald_db_unavailable_total", consumer="ingest") == before
