"""The batch loop's prefetch on a real broker: one fetch round is bounded, no record stalls.

librdkafka stops fetching once its queue is full, but the round that fills it lands
whole, bounded only by ``max.partition.fetch.bytes`` per partition (as fetched). Ingest
catching up on records that compress well reached 233 MB with librdkafka's 1 MiB;
``consumer_config`` sets 256 KiB. A record larger than that must still come (KIP-74),
or its partition would stall.
"""

from __future__ import annotations

import os
import time

import pytest
from confluent_kafka import Consumer, Producer

from config.settings import Settings
from consumers.loop import consumer_config
from producers.topics import ensure_topics

pytestmark = pytest.mark.integration

SMALL = 10 * 1024
BIG = 600_000  # over the per-partition bound, under message.max.bytes


def test_one_fetch_round_is_bounded_and_a_larger_record_still_comes(settings: Settings) -> None:
    topic = f"{settings.topic_prefix}.prefetch"
    ensure_topics(settings, [topic])
    # Random bytes do not compress, so fetched bytes are value bytes; one record per batch,
    # since a fetch returns whole batches.
    producer = Producer({**settings.kafka_client_config(), "batch.num.messages": 1, "linger.ms": 0})
    values = [os.urandom(SMALL) for _ in range(100)] + [os.urandom(BIG)]
    values += [os.urandom(SMALL) for _ in range(3)]
    for value in values:
        producer.produce(topic, value, partition=0)
    assert producer.flush(30) == 0

    conf = consumer_config(settings, f"{topic}-g")
    bound = conf["max.partition.fetch.bytes"]
    # Fetch again only when the queue is empty, so the queue holds exactly one round.
    consumer = Consumer({**conf, "queued.min.messages": 1})
    consumer.subscribe([topic])

    def take(n: int, timeout: float) -> list[bytes]:
        got = consumer.consume(num_messages=n, timeout=timeout)
        return [m.value() or b"" for m in got if m.error() is None]

    try:
        first: list[bytes] = []
        deadline = time.monotonic() + 30
        while not first and time.monotonic() < deadline:
            first = take(1, 1)
        assert first, "nothing arrived"
        time.sleep(1.0)  # the round has landed; the queue is not empty, so no other starts
        round_one = first + take(1000, 0)
        fetched = sum(len(v) for v in round_one)
        assert fetched <= bound + SMALL, f"one fetch round brought {fetched} bytes (bound {bound})"
        assert len(round_one) >= bound // SMALL - 1, "the round was cut short of the bound"

        got = list(round_one)
        deadline = time.monotonic() + 30
        while len(got) < len(values) and time.monotonic() < deadline:
            got += take(100, 1)
        assert got == values, "every record, the one over the bound too, in order"
    finally:
        consumer.close()
