"""``herald bench broker``: the broker's own CPU while its log grows, at a steady rate.

Why it exists: on the embedded broker (Tansu 0.6, memory storage) the CPU a fetch costs grows
with the number of record batches already in the partition, so at a steady rate the broker's
CPU climbs for as long as the log does. A chaos run at 2,000 records/s on two cores feels it
within its first minute. With Apache Kafka (an offset index per segment) the line stays flat.

A run, in this order:

1. the broker: ``HERALD_KAFKA_BOOTSTRAP`` when set, else an embedded one in a temporary folder
   (no PostgreSQL: nothing here touches it);
2. a fresh topic (``HERALD_TOPIC_PARTITIONS`` partitions) and ``--groups`` consumer groups
   tailing it from the start, each with the consumer settings every herald consumer uses;
3. ``--rate`` records per second for ``--seconds``, from one producer with ``--linger-ms``
   (each record is a JSON event of about 600 bytes, as herald's topics carry);
4. every ``--interval`` seconds, one line: records in the log, and the CPU the broker process
   used meanwhile, in cores (``None`` when the broker is not a process on this machine);
5. the end state: every group has read every record (else the run fails), and, last, one
   JSON line with the per-interval figures.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer

from config.settings import Settings
from consumers.loop import consumer_config
from core.errors import ConfigError
from herald.bench import common
from herald.bench.common import BenchError, emit_json, listening, progress, say, tree_cpu
from herald.embedded import EmbeddedBroker
from producers.publisher import KAFKA_LOG, producer_config
from producers.topics import ensure_topics

DRAIN_TIMEOUT_S = 60.0
JOIN_TIMEOUT_S = 60.0


def run_broker_bench(
    settings: Settings, *, rate: float, seconds: float, groups: int, linger_ms: int, interval_s: float
) -> int:
    """Run the whole benchmark; returns the process exit code."""
    if rate <= 0 or seconds <= 0 or groups < 1 or linger_ms < 0 or interval_s <= 0:
        raise ConfigError("need --rate > 0, --seconds > 0, --groups >= 1, --linger-ms >= 0, --interval > 0")
    run_id = uuid.uuid4().hex[:10]
    with _broker(settings) as (bench, where):
        say(f"herald bench broker: run {run_id}, {where}")
        return _run(
            bench,
            run_id,
            rate=rate,
            seconds=seconds,
            groups=groups,
            linger_ms=linger_ms,
            interval_s=interval_s,
        )


@contextmanager
def _broker(settings: Settings) -> Iterator[tuple[Settings, str]]:
    if "kafka_bootstrap" in settings.model_fields_set:
        yield settings, f"broker {settings.kafka_bootstrap}"
        return
    with tempfile.TemporaryDirectory(prefix="herald-bench-") as tmp:
        progress(f"herald bench: starting an embedded broker under {tmp} ...")
        broker = EmbeddedBroker(Path(tmp) / "broker")
        broker.start()
        try:
            yield settings.model_copy(update={"kafka_bootstrap": broker.bootstrap}), "embedded broker (Tansu)"
        finally:
            broker.stop()


class _Tail:
    """One group reading the topic from its start, counting records, until stopped."""

    def __init__(self, settings: Settings, group: str, topic: str) -> None:
        self.read = 0
        self.errors: list[str] = []
        self.joined = threading.Event()
        self._consumer = Consumer(consumer_config(settings, group), logger=KAFKA_LOG)
        self._consumer.subscribe([topic], on_assign=lambda _c, _parts: self.joined.set())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bench-{group}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for m in self._consumer.consume(1000, 0.1):
                    err = m.error()
                    if err is None:
                        self.read += 1
                    elif err.code() != KafkaError._PARTITION_EOF:
                        self.errors.append(err.str())
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _record(i: int) -> bytes:
    return json.dumps(
        {
            "id": f"bench-{i}",
            "type": "payment.failed",
            "user_id": f"user-{i % 1000}",
            "severity": "warning",
            "title": f"Payment {i} failed",
            "body": "The card on file was declined. " * 12,
            "data": {"invoice": f"in_{i:012d}", "amount": i % 10_000},
        }
    ).encode()


def _run(
    settings: Settings,
    run_id: str,
    *,
    rate: float,
    seconds: float,
    groups: int,
    linger_ms: int,
    interval_s: float,
) -> int:
    machine = common.machine()
    say(f"machine: {machine['cores']} cores, {machine['platform']}, Python {machine['python']}")
    topic = f"bench{run_id}.log"
    ensure_topics(settings, [topic])
    broker = listening(settings.kafka_bootstrap)
    tails = [_Tail(settings, f"bench-broker-{run_id}-{g}", topic) for g in range(groups)]
    producer = Producer(producer_config(settings, **{"linger.ms": linger_ms}), logger=KAFKA_LOG)
    failed: list[str] = []

    def acked(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failed.append(err.str())

    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for t in tails:  # the clock starts once every group reads: a join is not the broker's load
        if not t.joined.wait(max(0.0, deadline - time.monotonic())):
            raise BenchError(f"a group did not join within {JOIN_TIMEOUT_S:g} s")
    say(
        f"workload: {rate:,.0f} records/s for {seconds:g} s into {topic} ({settings.topic_partitions} "
        f"partitions), producer linger {linger_ms} ms, {groups} group(s) reading it"
    )
    intervals: list[dict[str, Any]] = []
    try:
        started = time.perf_counter()
        made = 0
        mark, cpu_mark = started, tree_cpu(broker)
        total = round(seconds * rate)
        while made < total:
            now = time.perf_counter()
            due = min(int((now - started) * rate) + 1, total)
            while made < due:
                producer.produce(topic, _record(made), on_delivery=acked)
                made += 1
            producer.poll(0)
            if now - mark >= interval_s or made == total:
                cpu = tree_cpu(broker)
                used = None if cpu is None or cpu_mark is None else round((cpu - cpu_mark) / (now - mark), 3)
                intervals.append({"at_s": round(now - started, 1), "records": made, "broker_cores": used})
                say(
                    f"{now - started:5.0f} s: {made:,} records in the log, slowest group read "
                    f"{min(t.read for t in tails):,}; broker {'-' if used is None else f'{used:.2f}'} cores"
                )
                mark, cpu_mark = now, cpu
            time.sleep(0.005)
        if producer.flush(30) or failed:
            raise BenchError(f"records not acknowledged: {failed[:1] or 'flush timed out'}")
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while min(t.read for t in tails) < made and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for t in tails:
            t.stop()
    read = [t.read for t in tails]
    errors = [e for t in tails for e in t.errors]
    if min(read) != made or max(read) != made or errors:
        raise BenchError(f"the groups read {read} of {made:,} records (errors: {errors[:1]})")
    cores = [i["broker_cores"] for i in intervals if i["broker_cores"] is not None]
    say(f"every group read all {made:,} records")
    if len(cores) >= 2:
        say(f"broker CPU: {cores[0]:.2f} cores in the first interval, {cores[-1]:.2f} in the last")
    emit_json(
        {
            "bench": "broker",
            "rate": rate,
            "seconds": seconds,
            "groups": groups,
            "linger_ms": linger_ms,
            "partitions": settings.topic_partitions,
            "records": made,
            "verified": True,
            "intervals": intervals,
            "broker_cores_first": cores[0] if cores else None,
            "broker_cores_last": cores[-1] if cores else None,
            "machine": machine,
        }
    )
    return 0
