"""Consumer-group offsets for operators: lag per partition, and resets for a replay.

``herald lag``, ``herald replay`` and (issue 16) ``herald lag-exporter`` use these. Every
broker call is bounded by a timeout and every Kafka error becomes a ``HeraldError`` with
one line to print.

Two facts of the embedded broker (Tansu 0.6, DESIGN.md) shape the code, while the code
stays right for Apache Kafka:

- its ``offsets_for_times`` answers the low watermark whatever the time, so every answer
  is checked against the records themselves (two reads on a correct broker) and, when
  wrong, replaced by a binary search over the partition's record timestamps;
- ``describe_consumer_groups`` answers ``EMPTY`` for a group that does not exist, so a
  group is known when ``list_consumer_groups`` lists it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import (
    ConsumerGroupState,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from config.settings import Settings
from consumers.reading import Record, headers_of
from core.errors import BrokerUnavailable, ConfigError
from producers.publisher import KAFKA_LOG
from producers.topics import Topics

log = logging.getLogger(__name__)

# Spring's retry-topic due time (epoch ms as UTF-8): a record waiting for its tier is not late.
H_DUE = "retry_topic-backoff-timestamp"
ACTIVE_STATES = frozenset(
    {
        ConsumerGroupState.STABLE,
        ConsumerGroupState.PREPARING_REBALANCING,
        ConsumerGroupState.COMPLETING_REBALANCING,
    }
)
_RELATIVE = re.compile(r"^-([1-9][0-9]*)(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """RFC 3339 (``2026-11-25T09:00:00Z``) or relative to now (``-2h``, ``-30m``, ``-1d``)."""
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(text.strip())
    if m:
        return now - timedelta(seconds=int(m.group(1)) * _UNIT[m.group(2)])
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ConfigError(
            f"--from {text!r}: give an RFC 3339 time with its offset (2026-11-25T09:00:00Z) "
            "or a time back from now (-90s, -30m, -2h, -1d)"
        )
    return when


# What the head reader may prefetch: about two fetches of a partition (librdkafka's
# max.partition.fetch.bytes is 1 MiB).
READER_PREFETCH_KB = 2048


def reader_config(settings: Settings) -> dict[str, Any]:
    """The head reader's consumer: a throw-away group, never committing."""
    return {
        **settings.kafka_client_config(),
        "group.id": f"herald-ops-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # It reads one head record per partition, then pauses it. librdkafka's
        # default prefetch (64 MiB, 100,000 records) filled up behind each head of a
        # lagging partition before the pause: the lag exporter reached 210 MB RSS in
        # herald chaos while ingest caught up on a backlog of large records.
        "queued.max.messages.kbytes": READER_PREFETCH_KB,
        "queued.min.messages": 1,
    }


class Kafka:
    """An admin client and a group-less reading consumer, closed together."""

    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        self.settings = settings
        self.timeout = timeout
        conf = settings.kafka_client_config()
        self.admin = AdminClient(conf, logger=KAFKA_LOG)
        self.reader = KafkaConsumer(reader_config(settings), logger=KAFKA_LOG)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Kafka:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self, exc: BaseException) -> BrokerUnavailable:
        """One line: librdkafka's own reason (never the KafkaError repr), else the timeout."""
        err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
        why = err.str() if isinstance(err, KafkaError) else str(exc)
        why = why or f"no answer in {self.timeout:.0f}s"
        return BrokerUnavailable(f"the broker at {self.settings.kafka_bootstrap} is unreachable: {why}")

    def topic_partitions(self) -> dict[str, list[int]]:
        """Every topic and its partitions, from one metadata request for all topics: one
        naming a topic creates it on a broker with auto-creation on (the embedded one does)."""
        try:
            found = self.admin.list_topics(timeout=self.timeout).topics
        except (KafkaException, TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        return {t: sorted(m.partitions) for t, m in found.items() if m.error is None and m.partitions}

    def partitions(self, topic: str) -> list[int]:
        """The topic's partitions; ``ConfigError`` when the topic does not exist."""
        found = self.topic_partitions().get(topic)
        if not found:
            raise ConfigError(f"unknown topic {topic!r} at {self.settings.kafka_bootstrap}")
        return found

    def topics(self) -> list[str]:
        return sorted(self.topic_partitions())

    def groups(self) -> list[str]:
        try:
            found = self.admin.list_consumer_groups(request_timeout=self.timeout).result(self.timeout)
        except (KafkaException, TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        return sorted(g.group_id for g in found.valid)

    def state(self, group: str) -> ConsumerGroupState:
        """The group's state from describe (the listed state reads UNKNOWN on Tansu)."""
        try:
            desc = self.admin.describe_consumer_groups([group], request_timeout=self.timeout)[group]
            state: ConsumerGroupState = desc.result(self.timeout).state
            return state
        except (KafkaException, TimeoutError) as exc:
            raise self._unreachable(exc) from exc

    def require_group(self, group: str) -> None:
        known = self.groups()
        if group not in known:
            raise ConfigError(f"unknown consumer group {group!r}; known: {', '.join(known) or 'none'}")

    def committed(self, group: str) -> dict[tuple[str, int], int]:
        """Every (topic, partition) -> committed offset the group has."""
        try:
            fut = self.admin.list_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(group)], request_timeout=self.timeout
            )[group]
            tps = fut.result(self.timeout).topic_partitions or []
        except (KafkaException, TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        return {(tp.topic, tp.partition): tp.offset for tp in tps if tp.offset >= 0}

    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        try:
            low, high = self.reader.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=self.timeout, cached=False
            )
        except (KafkaException, TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        return int(low), int(high)

    def all_watermarks(self, tps: Iterable[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]]:
        """Low and high watermarks of many partitions in two ListOffsets requests."""
        want = sorted(set(tps))
        if not want:
            return {}
        out: dict[tuple[str, int], list[int]] = {tp: [0, 0] for tp in want}
        for i, spec in enumerate((OffsetSpec.earliest(), OffsetSpec.latest())):  # type: ignore[no-untyped-call]
            try:
                futures = self.admin.list_offsets(
                    {TopicPartition(t, p): spec for t, p in want}, request_timeout=self.timeout
                )
                for tp, fut in futures.items():
                    out[(tp.topic, tp.partition)][i] = int(fut.result(self.timeout).offset)
            except (KafkaException, TimeoutError) as exc:
                raise self._unreachable(exc) from exc
        return {tp: (low, high) for tp, (low, high) in out.items()}

    def states(self, groups: Sequence[str]) -> dict[str, ConsumerGroupState]:
        """Each group's state, in one describe request."""
        try:
            futures = self.admin.describe_consumer_groups(list(groups), request_timeout=self.timeout)
            return {g: fut.result(self.timeout).state for g, fut in futures.items()}
        except (KafkaException, TimeoutError) as exc:
            raise self._unreachable(exc) from exc

    def read_many(self, heads: Iterable[tuple[str, int, int]]) -> dict[tuple[str, int, int], Record]:
        """The first record at or after each (topic, partition, offset), the partitions read
        together; a head that does not arrive within the timeout is left out."""
        rounds: dict[tuple[str, int], list[int]] = {}
        for t, p, o in sorted(set(heads)):
            rounds.setdefault((t, p), []).append(o)
        got: dict[tuple[str, int, int], Record] = {}
        while rounds:  # one offset per partition at a time: a partition is assigned once
            batch = {tp: offsets.pop(0) for tp, offsets in rounds.items()}
            rounds = {tp: offsets for tp, offsets in rounds.items() if offsets}
            got.update(self._read_heads(batch))
        return got

    def _read_heads(self, batch: dict[tuple[str, int], int]) -> dict[tuple[str, int, int], Record]:
        self.reader.assign([TopicPartition(t, p, o) for (t, p), o in batch.items()])
        got: dict[tuple[str, int, int], Record] = {}
        deadline = time.monotonic() + self.timeout
        try:
            while len(got) < len(batch) and time.monotonic() < deadline:
                m = self.reader.poll(0.2)
                if m is None:
                    continue
                tp = (str(m.topic()), int(m.partition() or 0))
                if m.error() is not None:
                    log.debug("read %s[%d]: %s", *tp, m.error(), extra={"topic": tp[0], "partition": tp[1]})
                    continue
                offset = batch.get(tp)
                if offset is None or (tp[0], tp[1], offset) in got:
                    continue
                got[(tp[0], tp[1], offset)] = Record(
                    tp[0],
                    tp[1],
                    int(m.offset() or 0),
                    m.key(),
                    m.value(),
                    headers_of(m),
                    int(m.timestamp()[1]),
                )
                self.reader.pause([TopicPartition(tp[0], tp[1])])  # read no further into it
            return got
        finally:
            # A paused partition stays paused when assigned again: resume before letting go.
            self.reader.resume([TopicPartition(t, p) for t, p in batch])
            self.reader.unassign()

    def read_at(self, topic: str, partition: int, offset: int) -> Record | None:
        """The first record at or after ``offset`` (None when none comes within the timeout)."""
        return self._read_heads({(topic, partition): offset}).get((topic, partition, offset))

    def alter(self, group: str, offsets: Sequence[tuple[str, int, int]]) -> None:
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(t, p, o) for t, p, o in offsets])
        try:
            self.admin.alter_consumer_group_offsets([request], request_timeout=self.timeout)[group].result(
                self.timeout
            )
        except (KafkaException, TimeoutError) as exc:
            raise BrokerUnavailable(f"could not reset the offsets of {group}: {exc}") from exc


# -- lag ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: nothing committed yet (the group starts at the earliest)
    end: int
    lag: int
    lag_seconds: float
    # Due records wait: the oldest unconsumed one is past its due time (on a retry topic) or
    # has no due time. False when caught up, or when only not-yet-due retry records wait.
    waiting: bool = False

    def as_json(self) -> dict[str, object]:
        return {
            "group": self.group,
            "topic": self.topic,
            "partition": self.partition,
            "committed": self.committed,
            "end": self.end,
            "lag": self.lag,
            "lag_seconds": self.lag_seconds,
        }


def due_ms(timestamp_ms: int, headers: dict[str, bytes]) -> int:
    """When a record became late: its retry due time if it has one, else its timestamp."""
    raw = headers.get(H_DUE)
    if raw:
        try:
            return max(timestamp_ms, int(raw.decode()))
        except (ValueError, UnicodeDecodeError):
            pass
    return timestamp_ms


def group_topics(settings: Settings, group: str) -> list[str]:
    """The topics a herald group reads (DESIGN.md's names), for partitions it has not committed yet."""
    topics = Topics(settings.topic_prefix)
    if group == "herald-ingest":
        return [topics.events]
    if group == "herald-digest":
        return [topics.digests_pending]
    if group.startswith("herald-deliver-"):
        return topics.channel_topics(group.removeprefix("herald-deliver-"), settings.delivery.retry_tiers)
    return []


@dataclass(frozen=True, slots=True)
class LagSample:
    """One look at the broker: every partition's lag, and each group's state."""

    rows: list[Lag]
    states: dict[str, ConsumerGroupState]
    at_ms: int


class LagReader:
    """Lag per group, topic and partition, sampled as often as asked (``herald lag`` once,
    ``herald lag-exporter`` every interval).

    Records: the end offset minus the committed one (the low watermark when nothing is
    committed, or when retention passed the committed offset); 0 when caught up, so an idle
    topic never shows lag. Seconds: the age of the oldest unconsumed record, from its
    timestamp (from its due time on a retry topic), read from the record itself: never an
    estimate from offset rates, so it stays true while a replay reprocesses old records.

    Broker calls per sample: the topic list, one describe for all groups, one offset list
    per group, one ListOffsets for every partition's watermarks, and one read of each
    lagging partition's head record, which is then cached by (topic, partition, offset):
    a record never changes, so a partition that does not move costs no read.
    """

    def __init__(self, k: Kafka, settings: Settings, cache_size: int = 50_000) -> None:
        self.k = k
        self.settings = settings
        self._prefix = settings.topic_prefix + "."
        self._due: dict[tuple[str, int, int], int] = {}
        self._cache_size = cache_size

    def sample(self, groups: Sequence[str], *, discover: bool = False, strict: bool = False) -> LagSample:
        """``groups`` and, with ``discover``, every other group with an offset on a topic under
        herald's prefix. ``strict``: a named group the broker does not know is a ConfigError
        (``herald lag --group``); otherwise it reads as a group that never committed."""
        now_ms = int(time.time() * 1000)
        names = list(dict.fromkeys(groups))
        if strict or discover:
            known = self.k.groups()
            if strict:
                for g in names:
                    if g not in known:
                        raise ConfigError(
                            f"unknown consumer group {g!r}; known: {', '.join(known) or 'none'}"
                        )
            if discover:
                names += [g for g in known if g not in names]
        wanted = self._partitions(names, strict)
        marks = self.k.all_watermarks({(t, p) for _, t, p, _ in wanted})
        starts = {
            (g, t, p): max(low if c is None else c, low)
            for g, t, p, c in wanted
            for low in [marks[(t, p)][0]]
        }
        dues = self._dues(
            {(t, p, starts[(g, t, p)]) for g, t, p, _ in wanted if marks[(t, p)][1] > starts[(g, t, p)]}
        )
        rows = []
        for group, t, p, at in wanted:
            start = starts[(group, t, p)]
            lag = max(0, marks[(t, p)][1] - start)
            seconds, waiting = 0.0, False
            if lag:
                due = dues.get((t, p, start))
                # A head that could not be read in time counts as waiting, with no age.
                waiting = due is None or due <= now_ms
                if due is not None:
                    seconds = max(0.0, (now_ms - due) / 1000)
            rows.append(Lag(group, t, p, at, marks[(t, p)][1], lag, round(seconds, 3), waiting))
        states = self.k.states(names) if names else {}
        return LagSample(rows, states, now_ms)

    def _partitions(self, names: list[str], strict: bool) -> list[tuple[str, str, int, int | None]]:
        """(group, topic, partition, committed offset) for each partition a group reads: those
        it committed under herald's prefix (any, when ``strict``), and every partition of the
        topics a herald group reads, committed or not."""
        existing = self.k.topic_partitions()
        wanted: list[tuple[str, str, int, int | None]] = []
        for group in names:
            committed = self.k.committed(group)
            keys = {tp for tp in committed if tp[0].startswith(self._prefix) or strict}
            for topic in group_topics(self.settings, group):
                keys |= {(topic, p) for p in existing.get(topic, [])}
            wanted += [(group, t, p, committed.get((t, p))) for t, p in sorted(keys) if t in existing]
        return wanted

    def _dues(self, heads: set[tuple[str, int, int]]) -> dict[tuple[str, int, int], int]:
        """The due time of the record at (or first after) each offset, read once and cached."""
        missing = {h for h in heads if h not in self._due}
        if missing:
            for (t, p, o), rec in self.k.read_many(missing).items():
                self._due[(t, p, o)] = due_ms(rec.timestamp_ms, rec.headers)
            if len(self._due) > self._cache_size:  # the oldest entries go first (insertion order)
                for key in list(self._due)[: len(self._due) - self._cache_size]:
                    del self._due[key]
        return {h: self._due[h] for h in heads if h in self._due}


def lag(settings: Settings, groups: Iterable[str] | None = None, timeout: float = 10.0) -> list[Lag]:
    """Per group, topic and partition: committed, end, lag in records and in seconds.

    Without ``groups``: every group with an offset on a topic under herald's prefix.
    """
    with Kafka(settings, timeout) as k:
        reader = LagReader(k, settings)
        if groups is None:
            return reader.sample([], discover=True).rows
        return reader.sample(list(groups), strict=True).rows


# -- replay ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reset:
    topic: str
    partition: int
    current: int | None
    new: int
    end: int

    @property
    def reread(self) -> int:
        """Records read again (those past the current offset are read anyway)."""
        current = self.end if self.current is None else self.current
        return max(0, min(current, self.end) - self.new)


def first_at_or_after(k: Kafka, topic: str, partition: int, ts_ms: int) -> int:
    """The offset of the first record with timestamp >= ``ts_ms`` (the end when none).

    Asks the broker (``offsets_for_times``), then checks the answer against the records:
    the record there is late enough and the one before it is not. When the check fails
    (the embedded broker's answer), a binary search over the record timestamps replaces it.
    """
    low, end = k.watermarks(topic, partition)
    if low >= end:
        return end
    try:
        got = k.reader.offsets_for_times([TopicPartition(topic, partition, ts_ms)], timeout=k.timeout)
        answer = got[0].offset
    except (KafkaException, TimeoutError) as exc:
        raise k._unreachable(exc) from exc
    answer = end if answer < 0 else answer

    def ts_at(offset: int) -> int | None:
        rec = k.read_at(topic, partition, offset)
        return None if rec is None else rec.timestamp_ms

    if _answer_holds(ts_at, low, end, answer, ts_ms):
        return answer
    log.debug(
        "%s[%d]: the broker's offsets_for_times was wrong; searching by timestamps",
        topic,
        partition,
        extra={"topic": topic, "partition": partition},
    )
    lo, hi = low, end
    while lo < hi:
        mid = (lo + hi) // 2
        ts = ts_at(mid)
        if ts is None or ts >= ts_ms:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _answer_holds(ts_at: Callable[[int], int | None], low: int, end: int, answer: int, ts_ms: int) -> bool:
    if answer > low:
        before = ts_at(answer - 1)
        if before is None or before >= ts_ms:
            return False
    if answer < end:
        here = ts_at(answer)
        return here is not None and here >= ts_ms
    return True


def plan_replay(
    settings: Settings, group: str, topics: Sequence[str], when: datetime, timeout: float = 10.0
) -> tuple[list[Reset], ConsumerGroupState]:
    """Where each partition of ``topics`` would start for ``group``, and the group's state."""
    ts_ms = int(when.timestamp() * 1000)
    with Kafka(settings, timeout) as k:
        k.require_group(group)
        state = k.state(group)
        committed = k.committed(group)
        resets = []
        for topic in topics:
            for p in k.partitions(topic):
                current = committed.get((topic, p))
                new = first_at_or_after(k, topic, p, ts_ms)
                if current is not None:
                    new = min(new, current)  # a replay reads again; it never skips unread records
                _, end = k.watermarks(topic, p)
                resets.append(Reset(topic, p, current, new, end))
    return resets, state


def is_active(state: ConsumerGroupState) -> bool:
    return state in ACTIVE_STATES


def apply_replay(settings: Settings, group: str, resets: Sequence[Reset], timeout: float = 10.0) -> None:
    """Commit the new offsets for ``group``; refuses if it became active meanwhile."""
    with Kafka(settings, timeout) as k:
        state = k.state(group)
        if is_active(state):
            raise ConfigError(refusal(group, state))
        k.alter(group, [(r.topic, r.partition, r.new) for r in resets])


def refusal(group: str, state: ConsumerGroupState) -> str:
    return (
        f"group {group} is active ({state.name}): stop its consumers first "
        "(the broker refuses offset changes for a group with members), then run this again"
    )
