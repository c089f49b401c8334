"""``herald lag-exporter`` against the real broker: exact records and seconds on
single-record batches (DESIGN.md), 0 when idle, true while a replay reprocesses, no false
lag from retry records that are not yet due, a stopped and a stalled group; and the
process itself (/metrics, SIGTERM, one-line errors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer
from prometheus_client import REGISTRY

from config.settings import Settings
from consumers.lag_exporter import LagExporter
from consumers.offsets import Kafka, Lag
from core import metrics
from core.http import Health
from herald.embedded import free_port
from herald.inspect import wait_group_stable
from producers.topics import Topics, ensure_topics
from tests.helpers import ROOT
from tests.ops_support import cli_env, new_group, produce_single, run, set_offsets

pytestmark = pytest.mark.integration

DUE = "retry_topic-backoff-timestamp"


@pytest.fixture
def kafka(settings: Settings) -> Iterator[Kafka]:
    with Kafka(settings, 5.0) as k:
        yield k


def exporter(settings: Settings, kafka: Kafka, group: str, stalled_after_s: float = 120.0) -> LagExporter:
    cfg = settings.lag_exporter.model_copy(update={"groups": (group,), "stalled_after_s": stalled_after_s})
    s = settings.model_copy(update={"lag_exporter": cfg})
    return LagExporter(s, kafka, [], metrics.lag_exporter(), Health())


def rows(ex: LagExporter, group: str) -> dict[tuple[str, int], Lag]:
    return {(r.topic, r.partition): r for r in ex.sample().rows if r.group == group}


def exported(group: str, topic: str, partition: int) -> tuple[float | None, float | None]:
    labels = {"group": group, "topic": topic, "partition": str(partition)}
    return (
        REGISTRY.get_sample_value("herald_consumer_lag_records", labels),
        REGISTRY.get_sample_value("herald_consumer_lag_seconds", labels),
    )


def status(group: str) -> str:
    on = [
        s
        for s in ("ok", "stalled", "stopped")
        if REGISTRY.get_sample_value("herald_consumer_group_status", {"group": group, "status": s}) == 1
    ]
    assert len(on) == 1, on
    return on[0]


def test_exact_lag_zero_when_idle_and_true_during_a_replay(settings: Settings, kafka: Kafka) -> None:
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, [topics.events])
    now = int(time.time() * 1000)
    stamps = [now - 100_000, now - 90_000, now - 80_000, now - 70_000, now - 60_000]
    assert produce_single(settings, topics.events, [b"{}"] * 5, timestamps_ms=stamps) == [0, 1, 2, 3, 4]
    group = new_group("lagx")
    set_offsets(settings, group, {(topics.events, 0): 5, (topics.events, 1): 0})
    ex = exporter(settings, kafka, group)

    # Caught up, and an idle partition that never held a record: 0 and 0, no false lag.
    got = rows(ex, group)
    assert (got[(topics.events, 0)].lag, got[(topics.events, 0)].lag_seconds) == (0, 0)
    assert (got[(topics.events, 1)].lag, got[(topics.events, 1)].lag_seconds) == (0, 0)
    assert exported(group, topics.events, 0) == (0, 0)
    assert status(group) == "ok", "nothing waits: a group with no member is not stopped"

    # An operator replays from offset 1: four records to read again, the oldest 90 s old.
    set_offsets(settings, group, {(topics.events, 0): 1})
    got = rows(ex, group)
    head = got[(topics.events, 0)]
    assert (head.committed, head.end, head.lag) == (1, 5, 4)
    assert 90 <= head.lag_seconds < 100
    records, seconds = exported(group, topics.events, 0)
    assert records == 4 and seconds is not None and 90 <= seconds < 100
    assert status(group) == "stopped", "records wait and no member reads them"

    # Reprocessing moves on: the figures follow the record now at the head, never a rate.
    set_offsets(settings, group, {(topics.events, 0): 3})
    head = rows(ex, group)[(topics.events, 0)]
    assert head.lag == 2 and 70 <= head.lag_seconds < 80

    set_offsets(settings, group, {(topics.events, 0): 5})
    assert exported(group, topics.events, 0)[0] == 2, "a scrape serves the last sample, not a new one"
    rows(ex, group)
    assert exported(group, topics.events, 0) == (0, 0)
    assert status(group) == "ok"


def test_retry_records_not_yet_due_are_no_lag(settings: Settings, kafka: Kafka) -> None:
    topics = Topics(settings.topic_prefix)
    retry = topics.retry("webhook", "5m")
    ensure_topics(settings, [retry])
    now = int(time.time() * 1000)
    later = [(DUE, str(now + 300_000).encode())]
    past = [(DUE, str(now - 30_000).encode())]
    produce_single(settings, retry, [b"a", b"b"], timestamps_ms=[now - 200_000] * 2, headers=[later, later])
    group = new_group("lagx-retry")
    set_offsets(settings, group, {(retry, 0): 0, (retry, 1): 0})
    ex = exporter(settings, kafka, group)

    head = rows(ex, group)[(retry, 0)]
    assert (head.lag, head.lag_seconds, head.waiting) == (2, 0, False)
    assert exported(group, retry, 0) == (2, 0)
    assert status(group) == "ok", "records waiting for their tier are not late"

    produce_single(settings, retry, [b"c"], timestamps_ms=[now - 200_000], headers=[past], partition=1)
    head = rows(ex, group)[(retry, 1)]
    assert head.lag == 1 and 30 <= head.lag_seconds < 40, "late from its due time, not its timestamp"
    assert status(group) == "stopped"


def test_an_active_group_that_commits_nothing_is_stalled(settings: Settings, kafka: Kafka) -> None:
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, [topics.events])
    group = new_group("lagx-stall")
    set_offsets(settings, group, {(topics.events, 0): 0, (topics.events, 1): 0})
    produce_single(settings, topics.events, [b"{}"] * 2)
    # A member that joins, polls and never commits: a consumer stuck on its batch.
    member = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": group,
            "enable.auto.commit": False,
            # Long enough that a loaded broker keeps the member joined (DESIGN.md): the group
            # must stay active, or it is stopped, not stalled.
            "session.timeout.ms": 10_000,
        }
    )
    try:
        member.subscribe([topics.events])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not member.assignment():
            member.poll(0.2)
        wait_group_stable(settings, group, timeout=30)
        ex = exporter(settings, kafka, group, stalled_after_s=1.0)
        ex.sample()
        assert status(group) == "ok", "its clock starts at the first sample"
        time.sleep(1.2)
        member.poll(0.1)
        ex.sample()
        assert status(group) == "stalled"
        # It commits: ok at the next sample.
        set_offsets_from(member, topics.events, 2)
        ex.sample()
        assert status(group) == "ok"
    finally:
        member.close()


def set_offsets_from(member: Consumer, topic: str, offset: int) -> None:
    from confluent_kafka import TopicPartition

    member.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:  # noqa: S310
        return str(resp.read().decode())


def test_the_process_serves_metrics_and_stops_on_sigterm(settings: Settings) -> None:
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, [topics.events])
    produce_single(settings, topics.events, [b"{}"] * 3)
    group = new_group("lagx-proc")
    set_offsets(settings, group, {(topics.events, 0): 1})
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HERALD_")},
        **cli_env(settings),
        "HERALD_METRICS_PORT": str(port),
        "HERALD_LAG_EXPORTER__INTERVAL_S": "0.5",
        "HERALD_LAG_EXPORTER__GROUPS": f'["{group}"]',
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "herald", "lag-exporter"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        want = f'herald_consumer_lag_records{{group="{group}",partition="0",topic="{topics.events}"}} 2.0'
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline and want not in text:
            try:
                text = _scrape(port)
            except OSError:
                time.sleep(0.2)
        assert want in text, text
        assert f'herald_consumer_group_status{{group="{group}",status="stopped"}} 1.0' in text
        assert "herald_lag_exporter_last_success_timestamp_seconds" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:  # noqa: S310
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_one_line_errors(settings: Settings, busy_port: int) -> None:
    down = run(
        settings,
        "lag-exporter",
        HERALD_KAFKA_BOOTSTRAP="127.0.0.1:1",
        HERALD_LAG_EXPORTER__TIMEOUT_S="1",
        HERALD_LOG_LEVEL="CRITICAL",
    )
    assert down.returncode == 1
    # Why depends on which call found the broker gone first: no answer, or librdkafka's reason.
    assert down.stderr.strip().splitlines() == [down.stderr.strip()]
    assert down.stderr.startswith("herald: the broker at 127.0.0.1:1 is unreachable: ")
    assert "KafkaError{" not in down.stderr, "librdkafka's reason, not its repr"
    # At the default level the log says what happened; the last line is still the one error.
    logged = run(
        settings, "lag-exporter", HERALD_KAFKA_BOOTSTRAP="127.0.0.1:1", HERALD_LAG_EXPORTER__TIMEOUT_S="1"
    )
    assert logged.returncode == 1
    assert (
        logged.stderr.strip()
        .splitlines()[-1]
        .startswith("herald: the broker at 127.0.0.1:1 is unreachable: ")
    )
    busy = run(settings, "lag-exporter", HERALD_METRICS_PORT=str(busy_port))
    assert busy.returncode == 2
    assert busy.stderr.strip().splitlines() == [busy.stderr.strip()]
    assert "HERALD_METRICS_PORT" in busy.stderr
