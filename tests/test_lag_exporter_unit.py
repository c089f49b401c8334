"""The lag exporter's group status, judged from samples over time (no broker: samples are
built by hand), and the collector that serves the last sample."""

from __future__ import annotations

from confluent_kafka import ConsumerGroupState
from prometheus_client import CollectorRegistry, generate_latest

from config.settings import Settings
from consumers.lag_exporter import StatusJudge
from consumers.offsets import READER_PREFETCH_KB, Lag, LagSample, reader_config
from core.metrics import LagCollector, PartitionLag

G = "herald-deliver-webhook"
ACTIVE = {G: ConsumerGroupState.STABLE}
EMPTY = {G: ConsumerGroupState.EMPTY}


def sample(*rows: Lag, states: dict[str, ConsumerGroupState] = ACTIVE) -> LagSample:
    return LagSample(list(rows), states, 0)


def row(committed: int | None, end: int, *, waiting: bool | None = None, topic: str = "t.deliveries") -> Lag:
    lag = end - (committed or 0)
    return Lag(G, topic, 0, committed, end, lag, 1.0 if lag else 0.0, lag > 0 if waiting is None else waiting)


def test_caught_up_or_moving_is_ok() -> None:
    judge = StatusJudge(stalled_after_s=10)
    assert judge.judge(sample(row(5, 5)), now=0) == {G: "ok"}
    assert judge.judge(sample(row(5, 9)), now=5) == {G: "ok"}
    # The committed offset moves every sample: a slow consumer with a backlog is not stalled.
    for t, committed in ((20, 6), (40, 7), (60, 8)):
        assert judge.judge(sample(row(committed, 100)), now=t) == {G: "ok"}


def test_stalled_when_due_records_wait_and_the_offset_does_not_move() -> None:
    judge = StatusJudge(stalled_after_s=10)
    assert judge.judge(sample(row(5, 9)), now=0) == {G: "ok"}
    assert judge.judge(sample(row(5, 9)), now=9.9) == {G: "ok"}
    assert judge.judge(sample(row(5, 9)), now=10) == {G: "stalled"}
    # It moves again: ok at once.
    assert judge.judge(sample(row(6, 9)), now=11) == {G: "ok"}


def test_an_idle_partition_that_gets_a_record_is_not_stalled_for_having_been_idle() -> None:
    judge = StatusJudge(stalled_after_s=10)
    assert judge.judge(sample(row(5, 5)), now=0) == {G: "ok"}
    assert judge.judge(sample(row(5, 5)), now=100) == {G: "ok"}
    # A record arrives at 100: the clock starts now, not when the offset last moved.
    assert judge.judge(sample(row(5, 6)), now=101) == {G: "ok"}
    assert judge.judge(sample(row(5, 6)), now=111) == {G: "stalled"}


def test_stopped_when_no_member_and_due_records_wait() -> None:
    judge = StatusJudge(stalled_after_s=10)
    assert judge.judge(sample(row(5, 9), states=EMPTY), now=0) == {G: "stopped"}
    assert judge.judge(sample(row(9, 9), states=EMPTY), now=1) == {G: "ok"}, "caught up: nothing waits"
    # A group the broker does not know (never started) with records waiting is stopped too.
    assert judge.judge(sample(row(None, 3), states={}), now=2) == {G: "stopped"}


def test_retry_records_not_yet_due_are_not_waiting() -> None:
    judge = StatusJudge(stalled_after_s=10)
    not_due = row(0, 4, waiting=False, topic="t.deliveries.webhook.retry.5m")
    for t in (0, 100, 1000):
        assert judge.judge(sample(not_due), now=t) == {G: "ok"}
        assert judge.judge(sample(not_due, states=EMPTY), now=t + 1) == {G: "ok"}


def test_watched_groups_without_partitions_are_ok() -> None:
    judge = StatusJudge(stalled_after_s=10)
    assert judge.judge(sample(), now=0, groups=["herald-ingest"]) == {"herald-ingest": "ok"}


def test_one_stuck_partition_stalls_the_group() -> None:
    judge = StatusJudge(stalled_after_s=10)
    moving = [Lag(G, "t", 1, c, 100, 100 - c, 1.0, True) for c in (10, 20, 30)]
    for i, t in enumerate((0, 6, 12)):
        assert judge.judge(sample(row(5, 9), moving[i]), now=t) == {G: "ok" if t < 10 else "stalled"}


def test_the_collector_serves_the_last_sample_only() -> None:
    registry = CollectorRegistry()
    collector = LagCollector()
    registry.register(collector)
    collector.update([PartitionLag(G, "t", 0, 3, 80.5), PartitionLag(G, "t", 1, 0, 0.0)], {G: "stalled"})
    assert (
        registry.get_sample_value("herald_consumer_lag_records", {"group": G, "topic": "t", "partition": "0"})
        == 3
    )
    assert (
        registry.get_sample_value("herald_consumer_lag_seconds", {"group": G, "topic": "t", "partition": "0"})
        == 80.5
    )
    assert [
        registry.get_sample_value("herald_consumer_group_status", {"group": G, "status": s})
        for s in ("ok", "stalled", "stopped")
    ] == [0, 1, 0]
    collector.update([PartitionLag(G, "t", 1, 0, 0.0)], {G: "ok"})
    text = generate_latest(registry).decode()
    assert 'partition="0"' not in text, "a partition gone from the sample is gone from /metrics"
    assert registry.get_sample_value("herald_consumer_group_status", {"group": G, "status": "ok"}) == 1


def test_the_head_reader_prefetches_little() -> None:
    """It reads one record per lagging partition: librdkafka's default prefetch (64 MiB)
    behind each head took the lag exporter to 210 MB RSS in herald chaos."""
    conf = reader_config(Settings(kafka={"queued.max.messages.kbytes": "65536"}))
    assert conf["queued.max.messages.kbytes"] == READER_PREFETCH_KB <= 4096
    assert conf["queued.min.messages"] == 1
    assert conf["enable.auto.commit"] is False
