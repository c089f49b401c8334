"""The batch loop's deferral on a real broker: one partition waits, the other flows.

A handler that is not the deliverer, so the loop's contract is checked on its own:
``apply`` returns a Deferral for partition 0's first record; the loop commits nothing
past it, pauses only partition 0, resumes it when due, and calls ``tick`` meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from confluent_kafka import Message, Producer

from config.settings import Settings
from consumers.loop import BatchLoop, Deferral
from herald.inspect import committed
from producers.topics import ensure_topics

pytestmark = pytest.mark.integration

HOLD_S = 3.0


class HoldPartitionZero:
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []  # (partition, offset, when)
        self.ticks = 0
        self.held_batches = 0  # batches that presented a held record before it was due
        self.release_at: float | None = None

    def prepare(self, messages: Sequence[Message]) -> Sequence[Message]:
        return messages

    def apply(self, messages: Sequence[Message]) -> list[Deferral]:
        now = time.time()
        held: Deferral | None = None
        for m in messages:
            p, o = m.partition() or 0, m.offset() or 0
            if p == 0 and (self.release_at is None or now < self.release_at):
                self.release_at = self.release_at or now + HOLD_S
                if held is None:
                    self.held_batches += 1
                    held = Deferral(m.topic() or "", 0, o, self.release_at)
                continue  # everything from the held record on waits with it
            self.seen.append((p, o, now))
        return [held] if held is not None else []

    def tick(self) -> None:
        self.ticks += 1


def test_a_deferred_partition_waits_and_the_other_flows(settings: Settings) -> None:
    topic = f"{settings.topic_prefix}.defer"
    ensure_topics(settings, [topic])
    producer = Producer(settings.kafka_client_config())
    for p in (0, 1):
        for i in range(3):
            producer.produce(topic, f"{p}-{i}".encode(), partition=p)
    assert producer.flush(10) == 0
    handler = HoldPartitionZero()
    loop = BatchLoop(settings, name="defer-test", group=f"{topic}-g", topics=[topic], handler=handler)
    started = time.time()
    loop.run(max_messages=6, timeout=30)
    by_partition = {p: [(o, t) for q, o, t in handler.seen if q == p] for p in (0, 1)}
    assert [o for o, _ in by_partition[1]] == [0, 1, 2]
    assert [o for o, _ in by_partition[0]] == [0, 1, 2], "each held record once, in order"
    assert handler.release_at is not None
    assert min(t for _, t in by_partition[0]) >= handler.release_at, "nothing before it was due"
    assert max(t for _, t in by_partition[1]) < handler.release_at, "partition 1 was not held back"
    assert time.time() - started < 20
    assert handler.held_batches <= 2, f"partition 0 was fetched {handler.held_batches} times while paused"
    assert handler.ticks > 3, "tick runs every turn, records or not"
    assert committed(settings, f"{topic}-g", [(topic, 0), (topic, 1)]) == {(topic, 0): 3, (topic, 1): 3}


def test_an_assigned_partition_starts_where_the_group_left_it(settings: Settings) -> None:
    """The offset guard's start, from the broker: the committed offset; with none, the log's
    first record; on an empty partition, the offset the next record will take."""
    from confluent_kafka import Consumer, TopicPartition

    topic = f"{settings.topic_prefix}.guard-start"
    ensure_topics(settings, [topic])
    producer = Producer(settings.kafka_client_config())
    for p, count in ((0, 5), (1, 2)):
        for i in range(count):
            producer.produce(topic, f"{p}-{i}".encode(), partition=p)
    assert producer.flush(30) == 0
    group = f"{settings.topic_prefix}-guard-start"
    committer = Consumer({**settings.kafka_client_config(), "group.id": group})
    committer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
    committer.close()

    loop = BatchLoop(settings, name="guard", group=group, topics=[topic], handler=lambda _m: None)
    try:
        parts = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        starts = {tp.partition: tp.offset for tp in loop._start_offsets(parts)}
    finally:
        loop._close()
    assert starts[0] == 3, "committed"
    assert starts[1] == 0, "no commit: the log's first record"
    assert all(starts[p] == 0 for p in range(2, settings.topic_partitions)), "empty: the next record's offset"


def test_a_fetch_that_jumps_is_read_again(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """The embedded broker's skipped batch, made on purpose: after offsets 0-4 the consumer's
    fetch position is moved to 8 (as a fetch that returned a later batch would), then 0-14 are
    there. The loop reads 5 on again and takes every record once, and commits 15."""
    import threading

    from confluent_kafka import TopicPartition

    topic = f"{settings.topic_prefix}.guard-jump"
    ensure_topics(settings, [topic])
    producer = Producer(settings.kafka_client_config())

    def produce(first: int, last: int) -> None:
        for i in range(first, last + 1):
            producer.produce(topic, str(i).encode(), partition=0)
        assert producer.flush(30) == 0

    produce(0, 4)
    seen: list[int] = []
    jumped = threading.Event()
    loop: BatchLoop

    def handler(messages: Sequence[Message]) -> None:
        seen.extend(m.offset() or 0 for m in messages)
        if 4 in seen and not jumped.is_set():
            loop._consumer.seek(TopicPartition(topic, 0, 8))
            jumped.set()

    group = f"{topic}-g"
    loop = BatchLoop(settings, name="guard-jump", group=group, topics=[topic], handler=handler)
    runner = threading.Thread(target=loop.run, kwargs={"max_messages": 15, "timeout": 30})
    with caplog.at_level("WARNING", logger="consumers.loop"):
        runner.start()
        assert jumped.wait(20), "the first five never came"
        produce(5, 14)
        runner.join(40)
    assert not runner.is_alive()
    assert seen == list(range(15)), "offsets 5-7 read again, and nothing twice"
    assert any("jumped from offset 5 to 8" in r.getMessage() for r in caplog.records)
    assert committed(settings, group, [(topic, 0)]) == {(topic, 0): 15}
