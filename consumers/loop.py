"""The batch loop every herald consumer runs.

Per batch, in this order (quix-streams' checkpoint order):

1. poll a bounded batch: at most ``batch_size`` records and ``batch_time_ms``; it goes
   sooner once the batch before it is applied and the client's queue has run dry (see
   ``_poll``), and ``prepare`` it (pure CPU: parse, validate, expand);
2. ``apply`` it, which makes the work durable: rows committed in PostgreSQL,
   downstream records acknowledged by the broker;
3. commit the batch's offsets, synchronously.

Two batches overlap: while batch N is applied on a worker thread (mostly waiting
on PostgreSQL and the broker), the loop polls and prepares batch N+1. Batches are
still applied and committed strictly one after another, in order. A rebalance
drains the batch in flight and commits it before the partitions go.

A fatal broker error (authentication, authorization: retrying cannot fix it)
fails /healthz and leaves ``run`` with ``FatalBrokerError``; the batch in flight
stays uncommitted.

A retryable failure in step 2 (PostgreSQL down, broker slow) keeps the batch in
hand and retries it with doubling backoff: no offset moves and nothing goes to a
dead-letter topic. A failed commit in step 3 (the group rebalanced under us)
drops the batch uncommitted and rewinds to its first offsets; whoever owns the
partitions next processes it again, which the handlers make idempotent.

A handler may leave the tail of a partition for later (a retry record not yet due, a
delivery another consumer still holds): ``apply`` returns a ``Deferral`` per such
partition. The loop commits what came before it, seeks the partition back to it and
pauses only that partition until the deferral's time; other partitions keep flowing, and
the loop never sleeps for it. A handler may also have optional hooks: ``interrupt()``
(a rebalance is revoking partitions: give up slow work in hand, so that the rebalance
never waits on a provider's timeout), ``on_assign``/``on_revoke`` (partitions gained or
lost) and ``tick()`` (called once per loop turn, with or without records).

A partition's offsets run on without a hole but for transaction markers, aborted
transactions, compaction and retention. A fetch that jumps past offsets the loop has not
seen is read once more from the first one missing (``OffsetGuard``): the embedded broker
(Tansu 0.6) now and then makes a produce batch readable after a later one, and without the
second read the loop would commit past records it never saw. The same jump twice is a hole
in the log, and is taken.

A handler may keep work in hand after ``apply`` returns (the deliverer's sends in flight).
It then says, through ``holds()``, the lowest offset per partition not yet durable: the
loop commits each partition only up to it, never past. ``pending()`` says work is in
hand, and the loop then gives the handler an empty batch each idle turn to make it
durable. At a rebalance or a stop the loop calls ``interrupt()``, lets the handler finish
(an empty batch, in hand), and commits what became durable.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from config.settings import Settings
from core import metrics
from core.errors import (
    AssignmentLost,
    DatabaseUnavailable,
    EnvironmentProblem,
    FatalBrokerError,
    RetryableError,
)
from core.http import Health
from producers.publisher import KAFKA_LOG

log = logging.getLogger(__name__)

# A poll gathers its batch in slices this long, so that it can go as soon as it should
# (librdkafka's batch consume waits for its whole count or its whole timeout).
POLL_SLICE_S = 0.005
# At an assignment, how long the committed offsets (and a new group's log starts) may take.
ASSIGN_LOOKUP_S = 5.0


class OffsetGuard:
    """Per partition, the offset after the last record the loop took, and any jump not yet
    read twice. ``check`` keeps a polled batch's records up to a partition's first jump and
    says where to seek to read the rest again."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, int], int] = {}
        self._jumps: dict[tuple[str, int], tuple[int, int]] = {}  # (first missing, found)

    def check(self, messages: Sequence[Message]) -> tuple[list[Message], list[TopicPartition], list[str]]:
        """The records to take, the seeks that read again from a jump, and what to log."""
        kept: list[Message] = []
        cut: dict[tuple[str, int], int] = {}
        notes: list[str] = []
        for m in messages:
            key = _key(m)
            if key in cut:
                continue
            offset = m.offset() or 0
            want = self._next.get(key)
            if want is not None and offset > want:
                if self._jumps.get(key) != (want, offset):
                    self._jumps[key] = (want, offset)  # first sight: read it again
                    cut[key] = want
                    continue
                del self._jumps[key]  # the same jump again: a hole in the log
            elif key in self._jumps:
                first, found = self._jumps.pop(key)
                if first <= offset < found:
                    notes.append(
                        f"a fetch of {key[0]}[{key[1]}] had jumped from offset {first} to {found}; "
                        f"read again, offset {offset} is there"
                    )
            self._next[key] = offset + 1
            kept.append(m)
        seeks = [TopicPartition(t, p, o) for (t, p), o in sorted(cut.items())]
        return kept, seeks, notes

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions lost: whoever owns them next starts from the committed offset."""
        for tp in partitions:
            self._next.pop((tp.topic, tp.partition), None)
            self._jumps.pop((tp.topic, tp.partition), None)

    def start(self, positions: Sequence[TopicPartition]) -> None:
        """Partitions gained: each starts at its committed offset (or where the log starts);
        an offset below 0 (not known) leaves the first record to set it."""
        self.forget(positions)
        for tp in positions:
            if tp.offset >= 0:
                self._next[(tp.topic, tp.partition)] = tp.offset


@dataclass(frozen=True, slots=True)
class Deferral:
    """Leave ``topic[partition]`` from ``offset`` on unprocessed until ``resume_at`` (epoch s)."""

    topic: str
    partition: int
    offset: int
    resume_at: float


class BatchHandler(Protocol):
    def prepare(self, messages: Sequence[Message]) -> Any:
        """Pure CPU work on a batch, no I/O; may run while the previous batch is applied."""

    def apply(self, prepared: Any) -> Sequence[Deferral] | None:
        """Make the batch durable, or raise. Must be idempotent: a batch can come twice.

        May return deferrals: per partition, the first record left for later. Everything
        before it is done. ``apply`` is called again with the same ``prepared`` after a
        retryable error, so a handler can keep what it already did on it.
        """


class CallableHandler:
    """Adapts a plain ``handler(messages)`` function: nothing to prepare."""

    def __init__(self, fn: Callable[[Sequence[Message]], None]) -> None:
        self._fn = fn

    def prepare(self, messages: Sequence[Message]) -> Sequence[Message]:
        return messages

    def apply(self, prepared: Sequence[Message]) -> None:
        self._fn(prepared)


@dataclass
class Applied:
    done: bool  # False: stopped (or out of time) before the batch was durable
    deferrals: Sequence[Deferral] = ()


@dataclass
class InFlight:
    batch: list[Message]
    future: Future[Applied]
    polled: float  # perf_counter when the batch's poll returned


def consumer_config(settings: Settings, group: str, **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # A group that joins late must never skip records that arrived before it.
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(100, settings.session_timeout_ms // 4),
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        "partition.assignment.strategy": "range",
        # A fetch with nothing to return waits at most this long on the broker (librdkafka's
        # default is 500 ms). Kafka answers as soon as records arrive; a broker that does not
        # (the embedded one) would add up to this much to a record's delay at low rates.
        "fetch.wait.max.ms": 100,
        # Prefetch: librdkafka fetches while the consumer's one queue holds under 16 MiB of
        # values and under `queued.min.messages` records (both count the whole queue, not a
        # partition), so several batches wait ahead. Its defaults (64 MiB, 100,000 records)
        # let ingest reach 260 MB RSS catching up in `herald chaos`. The queue overshoots by
        # the fetch that fills it, which is bounded only as fetched (compressed) bytes: per
        # partition, and per response. librdkafka sizes a response to the queue limit, and
        # the embedded broker (Tansu 0.6) may fill it from one partition: records that
        # compress 25-fold (the chaos load) put 35,805 records, 133 MB, in the queue at once,
        # and ingest peaked at 201-258 MB at 2,000/s. 256 KiB per partition and 1 MiB per
        # response (at least `message.max.bytes`, which librdkafka requires) keep a fetch
        # to tens of MB; `herald bench ingest` runs as fast. HERALD_KAFKA__* overrides each.
        "queued.max.messages.kbytes": 16_384,
        "max.partition.fetch.bytes": 256 * 1024,
        "fetch.max.bytes": _fetch_max_bytes(settings),
        "queued.min.messages": max(1000, 4 * settings.batch_size),
    }
    conf.update(settings.kafka_client_config())
    conf.update(extra)
    return conf


def _fetch_max_bytes(settings: Settings) -> int:
    """1 MiB, or the largest record the client allows if that is more (librdkafka's rule)."""
    try:
        return max(1 << 20, int(settings.kafka.get("message.max.bytes", 1_000_000)))
    except ValueError:
        return 1 << 20  # not a number: librdkafka refuses it with its own message


class Stopper:
    """Signal handlers only set an event. A second SIGINT exits hard."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._interrupts = 0

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise SystemExit(130)
        log.info("received %s: finishing the batch in hand", signal.Signals(signum).name)
        self.event.set()

    @property
    def stopping(self) -> bool:
        return self.event.is_set()

    def set(self) -> None:
        self.event.set()


@dataclass
class RunStats:
    batches: int = 0
    messages: int = 0


class BatchLoop:
    """Runs one handler over a consumer group; see the module docstring for the order."""

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler | Callable[[Sequence[Message]], None],
        stopper: Stopper | None = None,
        health: Health | None = None,
        consumer_extra: dict[str, Any] | None = None,
    ) -> None:
        self._settings = settings
        self._name = name
        # Structured log context on every line of this loop (HERALD_LOG_FORMAT=json).
        self._ctx: dict[str, Any] = {"consumer": name, "group": group}
        self._topics = list(topics)
        self._handler: BatchHandler = (
            CallableHandler(handler) if not hasattr(handler, "apply") else cast(BatchHandler, handler)
        )
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-apply")
        self._in_flight: InFlight | None = None
        self._stats = RunStats()
        self._deadline: float | None = None
        self.stopper = stopper or Stopper()
        self.health = health or Health()
        self._fatal: FatalBrokerError | None = None
        conf = consumer_config(settings, group, **(consumer_extra or {}))
        # error_cb: librdkafka's client-wide errors (authentication) never reach consume().
        self._consumer = Consumer(conf, error_cb=self._on_client_error, logger=KAFKA_LOG)
        self._metrics = metrics.loop()
        # Partitions paused by a deferral: (topic, partition) -> when to resume (epoch s).
        self._paused: dict[tuple[str, int], float] = {}
        # Partitions whose records the batch polled meanwhile must drop (they come again):
        # True when already repositioned (a deferral's seek), False when still to rewind
        # (revoked while the loop waited on the batch in flight).
        self._skip_next: dict[tuple[str, int], bool] = {}
        self._last_drain = True
        # Per partition: the offset after the last record applied (or the deferred one), and
        # the offset last committed. The commit is the first, or a handler's hold below it.
        self._position: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}
        self._guard = OffsetGuard()
        self._waiting = False  # in _await, serving rebalance callbacks
        self._gathering = False  # in _poll, holding records of the batch it gathers
        self._in_callback = False

    def run(
        self,
        *,
        max_messages: int | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> RunStats:
        """Loop until stopped; ``max_messages``/``timeout``/``idle_timeout`` bound test runs."""
        stats = self._stats
        deadline = None if timeout is None else time.monotonic() + timeout
        self._deadline = deadline
        last_data = time.monotonic()
        self._consumer.subscribe(self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self.stopper.stopping:
                if deadline is not None and time.monotonic() > deadline:
                    break
                if max_messages is not None and stats.messages >= max_messages:
                    break
                if idle_timeout is not None and time.monotonic() - last_data > idle_timeout:
                    break
                self.health.beat()
                self._resume_due()
                self._tick()
                batch = self._poll()  # may run _on_revoke, which drains the batch in flight
                polled = time.perf_counter()
                prepared = self._handler.prepare(batch) if batch else None
                if not self._drain():
                    # Batch N was dropped and rewound; N+1 was polled past it: drop it too.
                    self._rewind(batch)
                    continue
                if batch and self._skip_next:
                    # N+1 was polled past a partition that N deferred, or that a rebalance took
                    # while N was applied: those records come again.
                    skip, self._skip_next = self._skip_next, {}
                    dropped = [m for m in batch if _key(m) in skip]
                    if dropped:
                        self._rewind([m for m in dropped if not skip[_key(m)]])
                        batch = [m for m in batch if _key(m) not in skip]
                        prepared = self._handler.prepare(batch) if batch else None
                self._skip_next = {}
                if batch:
                    last_data = time.monotonic()
                    future = self._worker.submit(self._apply, batch, prepared)
                    self._in_flight = InFlight(batch, future, polled)
                elif self._pending():
                    # Work in hand and no new records: let the handler make it durable.
                    future = self._worker.submit(self._apply, [], self._handler.prepare([]))
                    self._in_flight = InFlight([], future, time.perf_counter())
            self._drain()
            self._wrap_up()
        finally:
            self._close()
        return stats

    def _drain(self) -> bool:
        """Wait for the batch in flight and commit it; False if it was dropped uncommitted.

        While it waits, the loop keeps serving the group protocol (see ``_await``); a revoke
        served there drains the same batch itself, and this call returns what that one did.
        """
        flight = self._in_flight
        if flight is None:
            return True
        self._await(flight)
        if self._in_flight is not flight:
            return self._last_drain  # drained by _on_revoke inside _await
        self._in_flight = None
        self._last_drain = self._finish(flight)
        return self._last_drain

    def _finish(self, flight: InFlight) -> bool:
        applied = flight.future.result()  # re-raises what apply raised (not retryable)
        if not applied.done:
            return False
        deferred = {(d.topic, d.partition): d for d in applied.deferrals}
        try:
            self._commit(flight.batch, deferred)
        except AssignmentLost as exc:
            self._metrics.assignment_lost.labels(self._name).inc()
            log.warning("%s: %s; dropping the batch uncommitted", self._name, exc, extra=self._ctx)
            self._rewind(flight.batch)
            return False
        for key, d in deferred.items():
            if self._defer(d):
                self._skip_next[key] = True
        done = [m for m in flight.batch if not _left(m, deferred)]
        if flight.batch:
            self._stats.batches += 1
            self._stats.messages += len(done)
            self._metrics.batch_seconds.labels(self._name).observe(time.perf_counter() - flight.polled)
            for topic, n in _per_topic(done).items():
                self._metrics.records_processed.labels(self._name, topic).inc(n)
        return True

    def _pending(self) -> bool:
        pending = getattr(self._handler, "pending", None)
        return bool(pending()) if pending is not None else False

    def _wrap_up(self) -> None:
        """A rebalance or a stop, with no batch in flight: the handler finishes (or gives up)
        the work still in hand, here and now; what became durable is committed."""
        if not self._pending():
            return
        interrupt = getattr(self._handler, "interrupt", None)
        if interrupt is not None:
            interrupt()
        applied = self._apply([], self._handler.prepare([]))
        if not applied.done:
            return
        try:
            self._commit_positions()
        except AssignmentLost as exc:
            log.warning("%s: %s; the work in hand comes again", self._name, exc, extra=self._ctx)

    def _await(self, flight: InFlight) -> None:
        """Wait for ``flight``'s apply while serving the group protocol.

        A consumer that stops polling cannot take part in a rebalance: the whole group would
        wait for this batch (a provider's timeout, say). So the wait polls, with every
        partition paused so that no record comes back; a record that does (fetched before
        the pause) is rewound. Inside a rebalance callback it just waits.
        """
        if self._in_callback:
            flight.future.exception()
            return
        paused: list[TopicPartition] = []
        # A batch that applies within a second never pauses anything: pausing drops what
        # the client prefetched, which a fast consumer (ingest) would pay for every batch.
        wait = 1.0
        stop_told = False
        try:
            while True:
                try:
                    flight.future.exception(timeout=wait)
                    return
                except TimeoutError:
                    wait = 0.2
                if self.stopper.stopping and not stop_told:
                    # A stop while the batch waits on slow work: let the handler wrap it up.
                    stop_told = True
                    interrupt = getattr(self._handler, "interrupt", None)
                    if interrupt is not None:
                        interrupt()
                if not paused:
                    paused = [tp for tp in self._assignment() if (tp.topic, tp.partition) not in self._paused]
                    if paused:
                        self._consumer.pause(paused)
                self._waiting = True
                stray = [m for m in self._consumer.consume(num_messages=100, timeout=0) if m.error() is None]
                self._waiting = False
                if stray:
                    self._rewind(stray)
        finally:
            self._waiting = False
            if paused:
                again = [tp for tp in self._assignment() if (tp.topic, tp.partition) not in self._paused]
                try:
                    self._consumer.resume(again)
                except KafkaException as exc:
                    log.debug("%s: resume after wait: %s", self._name, exc, extra=self._ctx)

    def _assignment(self) -> list[TopicPartition]:
        try:
            return list(self._consumer.assignment())
        except KafkaException:
            return []

    def _defer(self, d: Deferral) -> bool:
        """Pause the partition and seek it back to the deferred record; resume at its time."""
        tp = TopicPartition(d.topic, d.partition, d.offset)
        try:
            self._consumer.pause([tp])
            self._consumer.seek(tp)
        except KafkaException as exc:
            # No longer ours (a rebalance): the next owner starts from the committed offset.
            log.debug(
                "%s: cannot defer %s[%d]: %s",
                self._name,
                d.topic,
                d.partition,
                exc,
                extra={**self._ctx, "topic": d.topic, "partition": d.partition, "offset": d.offset},
            )
            return False
        self._paused[(d.topic, d.partition)] = d.resume_at
        return True

    def _resume_due(self) -> None:
        if not self._paused:
            return
        now = time.time()
        due = [key for key, at in self._paused.items() if at <= now]
        if not due:
            return
        for key in due:
            del self._paused[key]
        try:
            self._consumer.resume([TopicPartition(t, p) for t, p in due])
        except KafkaException as exc:
            log.debug("%s: resume: %s", self._name, exc, extra=self._ctx)

    def _tick(self) -> None:
        tick = getattr(self._handler, "tick", None)
        if tick is not None:
            tick()

    @property
    def paused(self) -> dict[tuple[str, int], float]:
        """Partitions held back by a deferral, and when each resumes (epoch seconds)."""
        return dict(self._paused)

    def _poll(self) -> list[Message]:
        """The next batch: at most ``batch_size`` records and ``batch_time_ms``, and no longer.

        While the batch before it is applied, records gather: a busy consumer's batches grow
        with its load, up to ``batch_size``. Once nothing is being applied, the batch goes as
        soon as a slice brings nothing more: on an idle consumer a record waits a few
        milliseconds, not ``batch_time_ms`` (which bounded every record's wait before, and
        was half of a critical's latency at a moderate rate, ingest and deliverer each).
        """
        s = self._settings
        deadline = time.monotonic() + s.batch_time_ms / 1000
        msgs: list[Message] = []
        while len(msgs) < s.batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._gathering = bool(msgs)  # a revoke inside consume() drops what we hold of it
            try:
                got = self._consumer.consume(
                    num_messages=s.batch_size - len(msgs), timeout=min(left, POLL_SLICE_S)
                )
            finally:
                self._gathering = False
            msgs += got
            flight = self._in_flight  # a revoke served inside consume() drains it
            if msgs and not got and (flight is None or flight.future.done()):
                break
        out = []
        for m in msgs:
            err = m.error()
            if err is None:
                out.append(m)
            elif is_fatal(err):
                self._fatal = self._fatal or fatal_error(self._name, err)
            elif err.code() != KafkaError._PARTITION_EOF:
                where = {"topic": m.topic(), "partition": m.partition()}
                log.warning("%s: consumer error: %s", self._name, err, extra={**self._ctx, **where})
        self._stop_if_fatal()
        out = self._continuous(out)
        for topic, n in _per_topic(out).items():
            self._metrics.records_consumed.labels(self._name, topic).inc(n)
        return out

    def _continuous(self, messages: list[Message]) -> list[Message]:
        """The records up to each partition's first jump in offsets; from a jump on, the
        partition is read again (see ``OffsetGuard``)."""
        kept, seeks, notes = self._guard.check(messages)
        for note in notes:
            log.warning("%s: %s", self._name, note, extra=self._ctx)
        for tp in seeks:
            log.debug(
                "%s: %s[%d] jumped past offset %d: reading it again",
                self._name,
                tp.topic,
                tp.partition,
                tp.offset,
                extra={**self._ctx, "topic": tp.topic, "partition": tp.partition, "offset": tp.offset},
            )
            try:
                self._consumer.seek(tp)
            except KafkaException as exc:
                log.debug("%s: seek: %s", self._name, exc, extra=self._ctx)  # no longer ours
        return kept

    def _on_client_error(self, err: KafkaError) -> None:
        """``error_cb``, called from inside consume(): remember a fatal one for ``_poll``."""
        if is_fatal(err):
            self._fatal = self._fatal or fatal_error(self._name, err)
        else:
            # librdkafka's own log line (herald.kafka) already says it; it retries by itself.
            log.debug("%s: client error: %s", self._name, err, extra=self._ctx)

    def _stop_if_fatal(self) -> None:
        """Retrying cannot help: fail /healthz, stop the worker's retries, leave ``run``."""
        if self._fatal is None:
            return
        self.health.fail(str(self._fatal))
        self.stopper.set()
        log.error("%s", self._fatal, extra=self._ctx)
        raise self._fatal

    def _apply(self, batch: list[Message], prepared: Any) -> Applied:
        """Step 2 on the worker, retried in hand while retryable; False if stopped (or out of time).

        Backoff doubles from ``db_backoff_min_ms`` to ``db_backoff_max_ms``, with equal
        jitter so that several processes do not retry in step. An environment problem is
        retried the same way, but as an alarm: an ERROR line saying what to do, and its
        own counter. Nothing is dead-lettered for it: the records are fine.
        """
        backoff = self._settings.db_backoff_min_ms / 1000
        while True:
            try:
                return Applied(True, self._handler.apply(prepared) or ())
            except RetryableError as exc:
                self._count_retry(exc)
                wait = backoff / 2 + random.uniform(0, backoff / 2)  # noqa: S311 (jitter, not a secret)
                level = logging.ERROR if isinstance(exc, EnvironmentProblem) else logging.WARNING
                log.log(
                    level,
                    "%s: %s; retrying the batch in %.1fs (no offset moves)",
                    self._name,
                    exc,
                    wait,
                    extra=self._ctx,
                )
                if self._deadline is not None:
                    wait = min(wait, max(0.0, self._deadline - time.monotonic()))
                if self.stopper.event.wait(wait) or (
                    self._deadline is not None and time.monotonic() >= self._deadline
                ):
                    return Applied(False)
                self.health.beat()
                backoff = min(backoff * 2, self._settings.db_backoff_max_ms / 1000)

    def _count_retry(self, exc: RetryableError) -> None:
        m = self._metrics
        if isinstance(exc, EnvironmentProblem):
            m.environment_errors.labels(self._name, exc.system).inc()
        elif isinstance(exc, DatabaseUnavailable):
            m.db_unavailable.labels(self._name).inc()
        else:
            m.broker_unavailable.labels(self._name).inc()

    def _commit(self, batch: Sequence[Message], deferred: dict[tuple[str, int], Deferral]) -> None:
        for tp in next_offsets(batch):
            key = (tp.topic, tp.partition)
            self._position[key] = deferred[key].offset if key in deferred else tp.offset
        try:
            self._commit_positions()
        except AssignmentLost:
            for key in {_key(m) for m in batch}:
                self._position.pop(key, None)
                self._committed.pop(key, None)
            raise

    def _commit_positions(self) -> None:
        """Commit every partition whose offset moved: its position, or a hold below it."""
        hold = getattr(self._handler, "holds", None)
        holds: Mapping[tuple[str, int], int] = hold() if hold is not None else {}
        offsets = []
        for key, position in self._position.items():
            target = min(position, holds.get(key, position))
            if target > self._committed.get(key, -1):
                offsets.append(TopicPartition(key[0], key[1], target))
        if not offsets:
            return
        started = time.perf_counter()
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            raise AssignmentLost(f"offset commit failed: {exc.args[0]}") from exc
        finally:
            self._metrics.commit_seconds.labels(self._name).observe(time.perf_counter() - started)
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset
        if log.isEnabledFor(logging.DEBUG):
            for tp in offsets:
                log.debug(
                    "%s: committed %s[%d] at offset %d",
                    self._name,
                    tp.topic,
                    tp.partition,
                    tp.offset,
                    extra={**self._ctx, "topic": tp.topic, "partition": tp.partition, "offset": tp.offset},
                )

    def _rewind(self, batch: Sequence[Message]) -> None:
        """Seek back to the batch's first offsets, where we still own the partition."""
        for tp in first_offsets(batch):
            try:
                self._consumer.seek(tp)
            except KafkaException:
                pass  # no longer ours: the new owner starts from the committed offset

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s: assigned %s", self._name, _describe(partitions), extra=self._ctx)
        self._guard.start(self._start_offsets(partitions))
        hook = getattr(self._handler, "on_assign", None)
        if hook is not None:
            hook(partitions)

    def _start_offsets(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Where each assigned partition's first fetch must begin: its committed offset,
        or, with none, the start of its log (``auto.offset.reset`` is earliest). Unknown
        (-1) when the broker does not say: the guard then starts at the first record."""
        try:
            committed = self._consumer.committed(partitions, timeout=ASSIGN_LOOKUP_S)
        except KafkaException as exc:
            log.debug("%s: committed offsets: %s", self._name, exc, extra=self._ctx)
            return [TopicPartition(tp.topic, tp.partition, -1) for tp in partitions]
        known = [TopicPartition(t.topic, t.partition, t.offset if t.error is None else -1) for t in committed]
        # No offset committed (not an error): the group starts where the log starts.
        fresh = [TopicPartition(t.topic, t.partition) for t in committed if t.error is None and t.offset < 0]
        starts = self._log_starts(fresh) if fresh else {}
        for tp in known:
            tp.offset = starts.get((tp.topic, tp.partition), tp.offset)
        return known

    def _log_starts(self, partitions: list[TopicPartition]) -> dict[tuple[str, int], int]:
        """Per partition, the offset of its first record, or of the next one written when it
        has none (a retry topic nothing has failed to yet); left out when the broker does not say."""
        try:
            # The first record at or after timestamp 0 (one request for all of them).
            firsts = self._consumer.offsets_for_times(
                [TopicPartition(tp.topic, tp.partition, 0) for tp in partitions], timeout=ASSIGN_LOOKUP_S
            )
        except KafkaException as exc:
            log.debug("%s: log starts: %s", self._name, exc, extra=self._ctx)
            return {}
        out: dict[tuple[str, int], int] = {}
        for tp in firsts:
            if tp.error is not None:
                continue
            if tp.offset >= 0:
                out[(tp.topic, tp.partition)] = tp.offset
                continue
            try:
                marks = self._consumer.get_watermark_offsets(tp, timeout=ASSIGN_LOOKUP_S, cached=False)
            except KafkaException as exc:
                log.debug("%s: log end: %s", self._name, exc, extra=self._ctx)
                continue
            if marks:
                out[(tp.topic, tp.partition)] = marks[1]
        return out

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._in_callback = True
        try:
            self._revoke(partitions)
        finally:
            self._in_callback = False

    def _revoke(self, partitions: list[TopicPartition]) -> None:
        # Finish and commit the batch in flight while the partitions are still ours; a
        # handler with slow work in hand (a provider's timeout) gives it up first.
        interrupt = getattr(self._handler, "interrupt", None)
        if interrupt is not None and (self._in_flight is not None or self._pending()):
            interrupt()
        self._drain()
        self._wrap_up()
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._guard.forget(partitions)
        for key in gone:
            self._position.pop(key, None)
            self._committed.pop(key, None)
        if self._waiting or self._gathering:
            # The batch polled before this wait (or being gathered) holds records of these
            # partitions: not ours now.
            for key in gone:
                self._skip_next.setdefault(key, False)
        held = [TopicPartition(t, p) for (t, p) in self._paused if (t, p) in gone]
        for t, p in list(self._paused):
            if (t, p) in gone:
                del self._paused[(t, p)]
        if held:
            try:  # the next owner of these partitions starts them unpaused
                self._consumer.resume(held)
            except KafkaException:
                pass
        hook = getattr(self._handler, "on_revoke", None)
        if hook is not None:
            hook(partitions)
        log.info("%s: revoked %s", self._name, _describe(partitions), extra=self._ctx)

    def _close(self) -> None:
        self._worker.shutdown(wait=True)
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("%s: consumer close: %s", self._name, exc, extra=self._ctx)


# Errors no retry can fix: the broker refuses this client's credentials or permissions.
FATAL_CODES = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)
AUTHENTICATION = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})


def is_fatal(err: KafkaError) -> bool:
    """True when the consumer can never work as configured, so the process must stop."""
    return bool(err.fatal()) or err.code() in FATAL_CODES


def fatal_error(name: str, err: KafkaError) -> FatalBrokerError:
    """One line: what the broker said, and what an operator must change."""
    if err.code() in AUTHENTICATION:
        hint = "check the credentials: HERALD_KAFKA__SASL_* or HERALD_KAFKA__SSL_*"
    elif err.code() in FATAL_CODES:
        hint = "grant this principal READ on the topics and the consumer group"
    else:
        hint = "the client cannot recover: see the herald.kafka log lines before this one"
    return FatalBrokerError(f"{name}: fatal broker error {err.name()}: {err.str()} ({hint})")


def next_offsets(batch: Sequence[Message]) -> list[TopicPartition]:
    """The offset to commit per partition: the highest offset in the batch, plus one."""
    top: dict[tuple[str, int], int] = {}
    for m in batch:
        key = (m.topic() or "", m.partition() or 0)
        off = m.offset() or 0
        if off + 1 > top.get(key, -1):
            top[key] = off + 1
    return [TopicPartition(t, p, o) for (t, p), o in sorted(top.items())]


def _per_topic(batch: Sequence[Message]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in batch:
        topic = m.topic() or ""
        counts[topic] = counts.get(topic, 0) + 1
    return counts


def _key(m: Message) -> tuple[str, int]:
    return (m.topic() or "", m.partition() or 0)


def _left(m: Message, deferred: dict[tuple[str, int], Deferral]) -> bool:
    """True when ``m`` is at or after its partition's deferral (left for later)."""
    d = deferred.get((m.topic() or "", m.partition() or 0))
    return d is not None and (m.offset() or 0) >= d.offset


def first_offsets(batch: Sequence[Message]) -> list[TopicPartition]:
    low: dict[tuple[str, int], int] = {}
    for m in batch:
        key = (m.topic() or "", m.partition() or 0)
        off = m.offset() or 0
        if key not in low or off < low[key]:
            low[key] = off
    return [TopicPartition(t, p, o) for (t, p), o in sorted(low.items())]


def _describe(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
