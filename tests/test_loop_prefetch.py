"""The batch loop's prefetch on a real broker: one fetch is bounded, and no record stalls.

librdkafka stops fetching once its queue is full, but the fetch that fills it lands
whole, bounded only in fetched bytes: ``max.partition.fetch.bytes`` per partition and
``fetch.max.bytes`` per response. The embedded broker honours only the second, and lets
the first partition take all of it. Ingest catching up on records that compress well
reached 258 MB when a response could carry 5 MiB of them; ``consumer_config`` sets
256 KiB and 1 MiB. A record larger than the bounds must still come (KIP-74), or its
partition would stall.
"""

from __future__ import annotations

import os
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from config.settings import Settings
from consumers.loop import consumer_config
from producers.topics import ensure_topics

pytestmark = pytest.mark.integration

SMALL = 10 * 1024
BIG = 600_000  # over the per-partition bound, under message.max.bytes
PARTITIONS = 6  # 6 x 256 KiB is more than one response may carry
PER_PARTITION = 40  # 400 KiB each: more than one partition's share


def test_one_fetch_is_bounded_and_a_larger_record_still_comes(settings: Settings) -> None:
    settings = settings.model_copy(update={"topic_partitions": PARTITIONS})
    topic = f"{settings.topic_prefix}.prefetch"
    ensure_topics(settings, [topic])
    # Random bytes do not compress, so fetched bytes are value bytes; one record per batch,
    # since a fetch returns whole batches.
    producer = Producer({**settings.kafka_client_config(), "batch.num.messages": 1, "linger.ms": 0})
    sent: dict[int, list[bytes]] = {
        p: [os.urandom(SMALL) for _ in range(PER_PARTITION)] for p in range(PARTITIONS)
    }
    sent[0] += [os.urandom(BIG), os.urandom(SMALL)]
    for p, values in sent.items():
        for value in values:
            producer.produce(topic, value, partition=p)
    assert producer.flush(30) == 0

    conf = consumer_config(settings, f"{topic}-g")
    per_partition, per_response = conf["max.partition.fetch.bytes"], conf["fetch.max.bytes"]
    assert PARTITIONS * per_partition > per_response + SMALL  # so the response bound is what holds
    # Fetch again only when the queue is empty, so the queue holds exactly one response;
    # every partition at once (assigned, not subscribed), so that one response is asked for all.
    consumer = Consumer({**conf, "queued.min.messages": 1})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    got: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}

    def take(n: int, timeout: float) -> int:
        messages = [m for m in consumer.consume(num_messages=n, timeout=timeout) if m.error() is None]
        for m in messages:
            got[m.partition() or 0].append(m.value() or b"")
        return sum(len(m.value() or b"") for m in messages)

    try:
        fetched = 0
        deadline = time.monotonic() + 30
        while not fetched and time.monotonic() < deadline:
            fetched = take(1, 1)
        assert fetched, "nothing arrived"
        time.sleep(1.0)  # the response has landed; the queue is not empty, so no other starts
        fetched += take(10_000, 0)
        assert fetched <= per_response + BIG, f"one fetch brought {fetched} bytes (bound {per_response})"
        assert fetched >= per_response - 2 * SMALL, "the fetch was cut short of its bound"

        deadline = time.monotonic() + 30
        while got != sent and time.monotonic() < deadline:
            take(100, 1)
        assert got == sent, "every record, the one over the bounds too, in order"
    finally:
        consumer.close()
