"""Fault-test helpers: a mixed event stream with known answers, a killable ingest
process, and the end-state check every fault test ends with.

The expected state is computed here from what the test produced, independently
of the code under test: idempotency keys follow the chain in DESIGN.md (explicit
key, else type and resource, else source and id; ``tests.helpers.expected_key``), channels follow the
preferences the test stored, and rate limits follow the configured limits.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import KafkaError, Message, Producer

from config.settings import CHANNELS, Settings
from herald.inspect import committed, read_topic
from producers.publisher import Position, producer_config
from producers.topics import Topics
from storage.db import Database
from storage.preferences import set_preferences
from tests.helpers import expected_key

REPO = Path(__file__).resolve().parent.parent
TABLES = (
    "notifications, deliveries, notification_preferences, channel_endpoints, digest_windows,"
    " digest_items, rate_limits"
)

# (user_id, idempotency_key)
NoteKey = tuple[str, str]


# --------------------------------------------------------------------------- preferences


@dataclass(frozen=True)
class UserPrefs:
    in_app: bool
    channels: frozenset[str]
    digest_minutes: int


def store_preferences(db_url: str, users: Sequence[str], settings: Settings) -> dict[str, UserPrefs]:
    """Store a spread of preferences (some columns left NULL = default); return the effective ones."""
    policy = settings.policy
    db = Database(db_url)
    effective: dict[str, UserPrefs] = {}
    try:
        for i, user in enumerate(users):
            changes: dict[str, Any] = {}
            if i % 4 == 0:
                changes["email"] = True
            elif i % 4 == 2:
                changes["email"] = False  # stored, equal to the default
            if i % 6 == 0:
                changes["push"] = True
            if i % 10 == 0:
                changes["webhook"] = True
            if i % 9 == 0:
                changes["in_app"] = False
            if i % 15 == 0:
                changes["digest_minutes"] = 0  # warnings go out at once
            if changes:
                set_preferences(db, user, changes)
            on = frozenset(c for c in CHANNELS if changes.get(c, policy.channel_default(c)))
            effective[user] = UserPrefs(
                in_app=changes.get("in_app", policy.in_app),
                channels=on,
                digest_minutes=changes.get("digest_minutes", policy.digest_minutes),
            )
    finally:
        db.close()
    return effective


# --------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class Expected:
    """One notification a valid record must produce."""

    user_id: str
    key: str
    severity: str
    occurred_at: datetime


@dataclass
class Stream:
    values: list[bytes | None] = field(default_factory=list)
    # Per record: the notifications it stands for; empty for a malformed record.
    expected: list[list[Expected]] = field(default_factory=list)
    malformed: list[bool] = field(default_factory=list)
    exact_duplicates: int = 0
    semantic_duplicates: int = 0

    def __len__(self) -> int:
        return len(self.values)

    def distinct(self) -> dict[NoteKey, Expected]:
        out: dict[NoteKey, Expected] = {}
        for exps in self.expected:
            for e in exps:
                first = out.setdefault((e.user_id, e.key), e)
                # The generator keeps every copy of a key identical where it matters.
                assert (first.severity, first.occurred_at) == (e.severity, e.occurred_at)
        return out

    def chunks(self, n: int) -> list[range]:
        size = -(-len(self) // n)
        return [range(i, min(i + size, len(self))) for i in range(0, len(self), size)]

    def valid_only(self) -> Stream:
        out = Stream(exact_duplicates=self.exact_duplicates, semantic_duplicates=self.semantic_duplicates)
        for v, e, m in zip(self.values, self.expected, self.malformed, strict=True):
            if not m:
                out.values.append(v)
                out.expected.append(e)
                out.malformed.append(False)
        return out

    def extend(self, other: Stream) -> None:
        self.values += other.values
        self.expected += other.expected
        self.malformed += other.malformed


SEVERITIES = ("info", "success", "warning", "critical")
TYPES = ("invoice.payment_failed", "job.failed", "deploy.succeeded", "comment.created")

MALFORMED: tuple[bytes | None, ...] = (
    b"not json {",
    b"",
    None,
    b"[1, 2, 3]",
    b'"just a string"',
    b'{"id": "m1", "type": "job.failed", "user_id": "u001"}',  # no title
    b'{"id": "m2", "type": "job.failed", "title": "t"}',  # no audience
    b'{"id": "m3", "type": "job.failed", "title": "t", "user_id": "u001", "severity": "urgent"}',
    b'{"id": "m4", "type": "job.failed", "title": "t", "user_id": "u001", "target_url": "http://x.io/a"}',
    b'{"id": "m5", "type": "job.failed", "title": "t", "recipients": []}',
    b'{"id": "m6", "type": "job.failed", "title": "t", "recipients": ["u001", ""]}',
    b'{"id": "", "type": "job.failed", "title": "t", "user_id": "u001"}',
    b'{"id": "m7", "type": "job.failed", "title": "' + b"x" * 201 + b'", "user_id": "u001"}',
    b'{"id": "m8", "type": "job.failed", "title": "t", "user_id": "u001", "occurred_at": "yesterday"}',
    b'{"id": "m9", "type": "job.failed", "title": "t", "user_id": "u001", "data": [1]}',
)


class StreamBuilder:
    """Valid events of every shape, exact and semantic duplicates, and malformed records."""

    def __init__(self, rng: random.Random, events_topic: str, users: Sequence[str], tag: str) -> None:
        self.rng = rng
        self.events_topic = events_topic
        self.users = list(users)
        self.tag = tag
        self.n = 0
        self.base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
        # A few users get bursts of criticals in one minute, so rate limits fold some into digests.
        self.hot = [u for i, u in enumerate(self.users) if i % 4 == 0][:3]
        # Every new event so far: later build() calls may repeat any of them.
        self.emitted: list[dict[str, Any]] = []

    def _new(self) -> tuple[dict[str, Any], list[Expected]]:
        rng = self.rng
        self.n += 1
        ev: dict[str, Any] = {
            "id": f"{self.tag}-{self.n}",
            "type": rng.choice(TYPES),
            "title": f"Event {self.n}",
            "severity": rng.choices(SEVERITIES, weights=(40, 15, 25, 20))[0],
        }
        minute = rng.randrange(0, 60)
        if self.hot and rng.random() < 0.02:
            ev["user_id"] = rng.choice(self.hot)
            ev["severity"] = "critical"
            minute = 7
        elif rng.random() < 0.06:
            pool = rng.sample(self.users, rng.randint(2, 4))
            ev["recipients"] = pool + [pool[0]] if rng.random() < 0.2 else pool  # a repeated recipient
        else:
            ev["user_id"] = rng.choice(self.users)
        occurred = self.base + timedelta(minutes=minute, seconds=rng.randrange(60))
        ev["occurred_at"] = occurred.isoformat()
        shape = rng.random()
        if shape < 0.12:
            ev["idempotency_key"] = f"{self.tag}-key-{self.n}"
        elif shape < 0.30 and "user_id" in ev:
            ev["resource_id"] = f"res-{self.n}"
        if rng.random() < 0.3:
            ev["source"] = "billing"
        if rng.random() < 0.5:
            ev["body"] = f"Details for event {self.n}: card 4111 1111 1111 1111, ops@example.com"
            ev["sensitive"] = rng.random() < 0.3
        if rng.random() < 0.3:
            ev["data"] = {"n": self.n, "secret": "sk_live_abcdefghijkl"}
        if rng.random() < 0.3:
            ev["target_url"] = f"/invoices/{self.n}"
        return ev, self._expected(ev)

    def _expected(self, ev: dict[str, Any]) -> list[Expected]:
        recipients = ev.get("recipients") or [ev["user_id"]]
        occurred = datetime.fromisoformat(ev["occurred_at"])
        out: list[Expected] = []
        for user in dict.fromkeys(recipients):
            key = expected_key(ev)
            out.append(Expected(user, key, ev["severity"], occurred))
        return out

    def build(self, records: int, *, duplicate_share: float = 0.10, malformed: int = 0) -> Stream:
        """``records`` records in all; ``duplicate_share`` of them repeat an earlier valid event."""
        rng = self.rng
        s = Stream()
        emitted = self.emitted
        valid = records - malformed
        dups = round(records * duplicate_share)
        dup_slots = set(rng.sample(range(0 if emitted else 1, valid), dups))
        for i in range(valid):
            if i in dup_slots:
                ev = rng.choice(emitted)
                if rng.random() < 0.25 and ("idempotency_key" in ev or "resource_id" in ev):
                    # Same notification, different event id: the same invoice failing twice.
                    ev = {**ev, "id": f"{ev['id']}-again-{i}", "title": ev["title"] + " (again)"}
                    s.semantic_duplicates += 1
                else:
                    s.exact_duplicates += 1
            else:
                ev, _ = self._new()
                emitted.append(ev)
            s.values.append(json.dumps(ev).encode())
            s.expected.append(self._expected(ev))
            s.malformed.append(False)
        for value in (MALFORMED * (malformed // len(MALFORMED) + 1))[:malformed]:
            at = rng.randrange(len(s.values) + 1)
            s.values.insert(at, value)
            s.expected.insert(at, [])
            s.malformed.insert(at, True)
        return s


def users(n: int) -> list[str]:
    return [f"u{i:03d}" for i in range(n)]


# --------------------------------------------------------------------------- producing


class OrderedProducer:
    """Produce values and learn where each one landed, in input order.

    (``KafkaPublisher.publish`` returns positions in acknowledgement order, which
    cannot be mapped back to the records it was given.)
    """

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self._producer = Producer(producer_config(settings))

    def produce(self, values: Sequence[bytes | None]) -> list[Position]:
        positions: list[Position | None] = [None] * len(values)
        failures: list[KafkaError] = []

        def callback(i: int) -> Any:
            def on_delivery(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    failures.append(err)
                else:
                    positions[i] = (msg.topic(), msg.partition(), msg.offset())

            return on_delivery

        for i, value in enumerate(values):
            while True:
                try:
                    self._producer.produce(self.topic, value=value, on_delivery=callback(i))
                    break
                except BufferError:
                    self._producer.poll(0.1)
        remaining = self._producer.flush(60)
        assert remaining == 0 and not failures, f"produce failed: {remaining} left, {failures[:3]}"
        return [p for p in positions if p is not None]


def produce_ordered(settings: Settings, topic: str, values: Sequence[bytes | None]) -> list[Position]:
    return OrderedProducer(settings, topic).produce(values)


class Trickle(threading.Thread):
    """Produce values a slice at a time on a thread, so records keep flowing during a fault."""

    def __init__(
        self,
        producer: OrderedProducer,
        values: Sequence[bytes | None],
        slice_size: int = 40,
        pause: float = 0.04,
    ) -> None:
        super().__init__(name="trickle", daemon=True)
        self._producer = producer
        self._values = list(values)
        self._slice = slice_size
        self._pause = pause
        self.positions: list[Position] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(0, len(self._values), self._slice):
                self.positions += self._producer.produce(self._values[i : i + self._slice])
                time.sleep(self._pause)
        except BaseException as exc:  # noqa: BLE001 (re-raised by result())
            self.error = exc

    def result(self, timeout: float = 120.0) -> list[Position]:
        self.join(timeout)
        assert not self.is_alive(), "producer thread did not finish"
        if self.error is not None:
            raise self.error
        assert len(self.positions) == len(self._values)
        return self.positions


def last_offsets(positions: Sequence[Position]) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for topic, partition, offset in positions:
        out[(topic, partition)] = max(offset, out.get((topic, partition), -1))
    return out


def committed_now(settings: Settings, group: str) -> dict[tuple[str, int], int]:
    topic = Topics(settings.topic_prefix).events
    return committed(settings, group, [(topic, p) for p in range(settings.topic_partitions)])


# --------------------------------------------------------------------------- the process


class HeraldProcess:
    """``herald ingest`` (or ``command``) as an OS process, restartable, each run logging to
    its own file; ``name`` is the batch loop's name in the log (``<name>: assigned``)."""

    def __init__(
        self,
        settings: Settings,
        group: str,
        log_dir: Path,
        *,
        command: tuple[str, ...] = ("ingest",),
        name: str = "ingest",
        **env: str,
    ) -> None:
        self.command = command
        self.name = name
        self.group = group
        self.log_dir = log_dir
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        base = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        self.env = {
            **base,
            "HERALD_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "HERALD_DATABASE_URL": settings.database_url.get_secret_value(),
            "HERALD_TOPIC_PREFIX": settings.topic_prefix,
            "HERALD_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "HERALD_SESSION_TIMEOUT_MS": "6000",
            "HERALD_BATCH_SIZE": "200",
            "HERALD_METRICS_PORT": "-1",
            "HERALD_DB_BACKOFF_MIN_MS": "100",
            "HERALD_DB_BACKOFF_MAX_MS": "1000",
            **env,
        }

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.name}-{self.runs}.log"

    def start(self) -> None:
        assert not self.alive(), "already running"
        self.runs += 1
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "herald.cli", *self.command, "--group", self.group],
                env=self.env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log_text():
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.returncode()}) before logging {needle!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not log {needle!r} in {timeout}s")
            time.sleep(0.05)

    def wait_count(self, needle: str, count: int, timeout: float) -> bool:
        """Wait until ``needle`` appears ``count`` times in this run's log; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.log_text().count(needle) < count:
            if not self.alive() or time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def wait_assigned(self, timeout: float = 60.0) -> None:
        self.wait_for_log(f"{self.name}: assigned", timeout)

    def kill(self) -> bool:
        """SIGKILL; True when the process was alive at that moment."""
        if not self.alive():
            return False
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return True

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tails(self, lines: int = 30) -> str:
        out = []
        for i in range(1, self.runs + 1):
            path = self.log_dir / f"{self.name}-{i}.log"
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            out.append(f"----- {path} (last {lines} of {len(text)} lines)")
            out += text[-lines:]
        return "\n".join(out)

    def cleanup(self) -> None:
        if self.alive():
            self.kill()


# --------------------------------------------------------------------------- the end state


def truncate(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} CASCADE")


def _dlq_positions(settings: Settings) -> dict[tuple[str, int, int], bytes | None]:
    out: dict[tuple[str, int, int], bytes | None] = {}
    for rec in read_topic(settings, Topics(settings.topic_prefix).events_dlq):
        h = rec.headers
        topic = h["kafka_dlt-original-topic"].decode()
        partition = struct.unpack(">i", h["kafka_dlt-original-partition"])[0]
        offset = struct.unpack(">q", h["kafka_dlt-original-offset"])[0]
        out[(topic, partition, offset)] = rec.value
    return out


def dlq_count(settings: Settings) -> int:
    return len(read_topic(settings, Topics(settings.topic_prefix).events_dlq))


def check_end_state(  # noqa: C901 (one check after another, in the order of DESIGN.md)
    settings: Settings,
    db_url: str,
    stream: Stream,
    positions: Sequence[Position],
    prefs: dict[str, UserPrefs],
) -> dict[str, int]:
    """Invariants 1-3 on the end state; returns counts for the test's report."""
    topics = Topics(settings.topic_prefix)
    policy = settings.policy
    distinct = stream.distinct()
    with psycopg.connect(db_url, autocommit=True) as conn:
        notes = {
            (str(r[0]), str(r[1])): (str(r[2]), r[3], bool(r[4]))
            for r in conn.execute(
                "SELECT user_id, idempotency_key, severity, occurred_at, hidden FROM notifications"
            ).fetchall()
        }
        rows = conn.execute(
            "SELECT d.id, n.user_id, n.idempotency_key, d.channel, d.route, d.reason, d.published_at,"
            " n.occurred_at FROM deliveries d JOIN notifications n ON n.id = d.notification_id"
        ).fetchall()
        orphans = conn.execute(
            "SELECT count(*) FROM deliveries d LEFT JOIN notifications n ON n.id = d.notification_id"
            " WHERE n.id IS NULL"
        ).fetchone()
        rate_rows = {
            (str(r[0]), str(r[1]), r[2]): int(r[3])
            for r in conn.execute("SELECT user_id, channel, window_start, count FROM rate_limits").fetchall()
        }

    # Invariant 1 and 2: exactly one row per distinct (user_id, idempotency_key).
    missing = set(distinct) - set(notes)
    extra = set(notes) - set(distinct)
    assert not missing and not extra, (
        f"notifications: {len(notes)} rows, {len(distinct)} expected; "
        f"missing {sorted(missing)[:5]} ({len(missing)}), unexpected {sorted(extra)[:5]} ({len(extra)})"
    )
    for k, e in distinct.items():
        severity, occurred, hidden = notes[k]
        assert severity == e.severity and occurred == e.occurred_at, (k, notes[k], e)
        assert hidden == (not prefs[k[0]].in_app), f"{k}: hidden={hidden}, in_app={prefs[k[0]].in_app}"

    # Exactly one delivery row per (external notification, enabled channel), nothing else.
    expected_deliveries = {
        (u, key, ch)
        for (u, key), e in distinct.items()
        if e.severity in ("warning", "critical")
        for ch in prefs[u].channels
    }
    got = Counter((str(r[1]), str(r[2]), str(r[3])) for r in rows)
    assert orphans is not None and orphans[0] == 0, f"{orphans[0]} delivery rows without a notification"
    twice = [k for k, n in got.items() if n > 1]
    assert not twice, (
        f"{len(twice)} (notification, channel) pairs with more than one delivery row: {twice[:5]}"
    )
    lacking = expected_deliveries - set(got)
    surplus = set(got) - expected_deliveries
    assert not lacking and not surplus, (
        f"deliveries: {len(got)} rows, {len(expected_deliveries)} expected; "
        f"missing {sorted(lacking)[:5]} ({len(lacking)}), unexpected {sorted(surplus)[:5]} ({len(surplus)})"
    )

    # Routes: critical (and warnings of digest_minutes=0 users) go at once unless rate-limited.
    planned: Counter[tuple[str, str, datetime]] = Counter()
    immediate: Counter[tuple[str, str, datetime]] = Counter()
    for _id, user, key, channel, route, reason, _pub, occurred in rows:
        e = distinct[(str(user), str(key))]
        at_once = e.severity == "critical" or prefs[str(user)].digest_minutes == 0
        window = (str(user), str(channel), occurred.replace(second=0, microsecond=0))
        if at_once:
            planned[window] += 1
            assert (route, reason) in (("immediate", None), ("digest", "rate_limited")), (
                user,
                key,
                route,
                reason,
            )
            immediate[window] += route == "immediate"
        else:
            assert (route, reason) == ("digest", "warning"), (user, key, channel, route, reason)
    for window, n in planned.items():
        limit = policy.rate_limit(window[1])
        assert immediate[window] == min(n, limit), (
            f"{window}: {immediate[window]} immediate of {n}, limit {limit}"
        )
    counted = {(u, c, w.astimezone(UTC)): n for (u, c, w), n in rate_rows.items()}
    wanted = {(u, c, w.astimezone(UTC)): n for (u, c, w), n in planned.items()}
    assert counted == wanted, (
        "rate_limits counters differ from the immediate sends asked for: "
        f"{sorted(set(counted.items()) ^ set(wanted.items()))[:6]}"
    )

    # Invariant 3: the outbox is drained, and every delivery row has its record on its topic.
    unpublished = [r[0] for r in rows if r[6] is None]
    assert not unpublished, f"{len(unpublished)} delivery rows never marked published: {unpublished[:5]}"
    on_topic: dict[str, dict[str, dict[str, Any]]] = {}
    for topic in [topics.deliveries(c) for c in CHANNELS] + [topics.digests_pending]:
        seen: dict[str, dict[str, Any]] = {}
        for rec in read_topic(settings, topic):
            assert rec.value is not None
            payload = json.loads(rec.value)
            seen[payload["delivery_id"]] = payload
            assert "data" not in payload and "body" not in payload, f"{topic}: private fields leaked"
        on_topic[topic] = seen
    by_id = {str(r[0]): r for r in rows}
    lost = []
    for delivery_id, r in by_id.items():
        topic = topics.deliveries(str(r[3])) if r[4] == "immediate" else topics.digests_pending
        payload = on_topic[topic].get(delivery_id)
        if payload is None:
            lost.append((delivery_id, topic))
        else:
            assert (payload["user_id"], payload["channel"], payload["route"]) == (r[1], r[3], r[4]), payload
    assert not lost, f"{len(lost)} of {len(by_id)} delivery rows have no record on their topic: {lost[:5]}"
    stray = [(t, d) for t, seen in on_topic.items() for d in seen if d not in by_id]
    assert not stray, f"{len(stray)} records on delivery topics without a delivery row: {stray[:5]}"

    # Every malformed record is on the dead-letter topic, and nothing valid is.
    dlq = _dlq_positions(settings)
    bad = {pos: stream.values[i] for i, pos in enumerate(positions) if stream.malformed[i]}
    not_dead = sorted(set(bad) - set(dlq))
    assert not not_dead, f"{len(not_dead)} malformed records not on the DLQ: {not_dead[:5]}"
    wrongly_dead = sorted(set(dlq) - set(bad))
    assert not wrongly_dead, f"{len(wrongly_dead)} valid records on the DLQ: {wrongly_dead[:5]}"
    for pos, value in bad.items():
        # Empty and null values compare equal: the embedded broker may hand b"" back as null.
        assert (dlq[pos] or b"") == (value or b""), (
            f"DLQ record for {pos} does not keep the original value: {dlq[pos]!r:.80} != {value!r:.80}"
        )

    return {
        "records": len(stream),
        "notifications": len(notes),
        "deliveries": len(rows),
        "immediate": sum(1 for r in rows if r[4] == "immediate"),
        "rate_limited": sum(1 for r in rows if r[5] == "rate_limited"),
        "dead_letters": len(bad),
    }
