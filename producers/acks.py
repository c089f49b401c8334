"""One producer shared by many concurrent callers, each waiting for its own record's ack.

``KafkaPublisher.publish`` flushes the whole producer, so two callers would wait on each
other's records. Here a poll thread serves librdkafka's delivery callbacks, and each
record gets its own result: a callback for threads, an asyncio future for the receiver
(resolved on the caller's loop with ``call_soon_threadsafe``). Nothing flushes on the hot
path; ``linger.ms`` batches the records of concurrent requests into one produce request.

A second thread asks the broker for the topic's metadata every second: the answer (or
its absence) is what ``/healthz`` reports, so a broker that is frozen or gone fails the
check within a few seconds even when no request arrives.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from config.settings import Settings
from core.errors import BrokerUnavailable, FatalBrokerError, HeraldError
from core.http import Health
from producers.publisher import KAFKA_LOG, OutRecord, Position, classify, producer_config

log = logging.getLogger(__name__)

Done = Callable[[HeraldError | None, Position | None], None]


class BrokerHealth(Health):
    """Healthy while the broker answered a metadata request recently (``beat`` on each answer)."""

    def status(self) -> str:
        if self._failed is not None:
            return f"failed: {self._failed}"
        return "ok" if self.ok() else "broker unreachable"


class AckingProducer:
    """An idempotent ``acks=all`` producer with a poll thread; ``produce`` never blocks."""

    def __init__(
        self,
        settings: Settings,
        *,
        probe_topic: str,
        probe_timeout_s: float = 5.0,
        probe_every_s: float = 1.0,
        health: BrokerHealth | None = None,
        **extra: str | int | bool,
    ) -> None:
        self._producer = Producer(producer_config(settings, **extra), logger=KAFKA_LOG)
        self._probe_topic = probe_topic
        self._probe_timeout = probe_timeout_s
        self._probe_every = probe_every_s
        self.health = health or BrokerHealth(stale_after=probe_timeout_s + 2 * probe_every_s)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._poll, name="producer-poll", daemon=True),
            threading.Thread(target=self._probe, name="broker-probe", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.05)
            except Exception:
                # An exception from a callback surfaces here; this thread must outlive it, or
                # no request would ever see its ack again.
                log.exception("producer poll: a delivery callback failed")

    def _probe(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                meta = self._producer.list_topics(self._probe_topic, timeout=self._probe_timeout)
                topic = meta.topics.get(self._probe_topic)
                if topic is not None and topic.error is None:
                    self.health.beat()
            except KafkaException as exc:
                log.debug("broker probe failed: %s", exc)
            self._stop.wait(max(0.0, self._probe_every - (time.monotonic() - started)))

    def produce(self, rec: OutRecord, done: Done) -> None:
        """Hand ``rec`` to librdkafka; ``done`` runs on the poll thread with the outcome.

        Raises ``BrokerUnavailable`` at once when the local queue is full (the broker has
        not taken records for a while): the caller answers 503 rather than blocking.
        """

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                done(None, (msg.topic() or "", msg.partition() or 0, msg.offset() or 0))
                return
            exc = classify(rec, err)
            if isinstance(exc, FatalBrokerError):
                self.health.fail(str(exc))
            done(exc, None)

        try:
            self._producer.produce(
                rec.topic,
                value=rec.value,
                key=rec.key,
                headers=list(rec.headers) or None,
                on_delivery=on_delivery,
            )
        except BufferError as exc:
            raise BrokerUnavailable(f"{len(self)} records waiting for the broker: local queue full") from exc
        except KafkaException as exc:
            arg = exc.args[0] if exc.args else None
            err = arg if isinstance(arg, KafkaError) else KafkaError(KafkaError._FAIL, str(exc))
            raise classify(rec, err) from exc

    async def publish(self, rec: OutRecord, timeout: float) -> Position:
        """Wait for this record's ack only; ``TimeoutError`` after ``timeout`` seconds.

        After a timeout librdkafka still holds the record and may deliver it later: the
        sender, told to retry, then sends a duplicate, which ingest deduplicates.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Position] = loop.create_future()

        def done(exc: HeraldError | None, pos: Position | None) -> None:
            hand_over(loop, fut, exc, pos)

        self.produce(rec, done)
        return await asyncio.wait_for(fut, timeout)

    def __len__(self) -> int:
        """Records handed over and not yet acknowledged or failed (the local queue)."""
        return len(self._producer)

    def flush(self, timeout: float) -> int:
        """Wait for every record in flight; return how many are still unacknowledged."""
        return int(self._producer.flush(timeout))

    def close(self, timeout: float = 30.0) -> None:
        """Flush what is in flight, then stop the threads."""
        remaining = self.flush(timeout)
        if remaining:
            log.error("%d record(s) still unacknowledged after %.0fs at shutdown", remaining, timeout)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self._probe_timeout + 1)


def hand_over(
    loop: asyncio.AbstractEventLoop,
    fut: asyncio.Future[Position],
    exc: HeraldError | None,
    pos: Position | None,
) -> None:
    """From the poll thread to the request's loop. A record that outlived its request (a 503
    answered, then the ack came) may be acknowledged after that loop has closed, during the
    final flush: nobody waits for it any more, and that must not raise into librdkafka."""
    try:
        loop.call_soon_threadsafe(_resolve, fut, exc, pos)
    except RuntimeError:  # the loop is closed
        pass


def _resolve(fut: asyncio.Future[Position], exc: HeraldError | None, pos: Position | None) -> None:
    if fut.done():  # the request timed out (or its client went away) first
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        assert pos is not None
        fut.set_result(pos)
