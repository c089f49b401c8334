"""The chaos run's load: users with mixed preferences and endpoints, and a steady stream of
events whose every expected outcome is written down as it is sent.

What a record must become is decided here, from the documented contracts, never by asking
herald's own code: the idempotency key follows the README's tier table (``k:`` explicit key,
``r:`` type and resource, ``s:`` source and id), mapped records follow the shipped rules in
``config/rules`` (Stripe's invoice and GitHub's comment mapping, read in the README), and a
malformed record names the ``herald-dlt-reason`` it must be dead-lettered with.

Everything random comes from one ``random.Random(seed)``, so a seed gives the same users, the
same preferences and the same sequence of events (the timing of a run is the machine's).
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from config.settings import Settings
from core.errors import HeraldError
from herald.produce import ReceiverClient
from producers.publisher import KAFKA_LOG, producer_config
from producers.signatures import scheme_for

KafkaHeaders = list[tuple[str, str | bytes | None]]
SEVERITIES = ("info", "success", "warning", "critical")
SEVERITY_WEIGHTS = (35, 15, 35, 15)
# How a new (not repeated) record is made, and how often.
KINDS = ("native", "receiver", "cloudevent", "stripe", "github", "malformed", "poison")
KIND_WEIGHTS = (52, 14, 14, 6, 5, 7, 2)
DUPLICATE_SHARE = 0.20
# The receiver source herald chaos configures (standard-webhooks, a secret for the run).
RECEIVER_SOURCE = "chaos"
EVENT_SOURCE = "chaos-app"
# Records first sent through the receiver name another source: their time is when the
# request was made, not when the receiver produced them, so the latency figures (record
# timestamp to the provider) leave them out.
HOOK_SOURCE = "chaos-hooks"
# The load's producer batches for this long, as a throughput-tuned upstream service would.
# The time counts in every latency (a record's time is the moment the load made it). The
# embedded broker's CPU per fetch grows with the record batches already in the partition
# (`herald bench broker`: 0.11 -> 0.48 cores over a minute at 2,000 records/s and 5 ms;
# flat at 0.05 with 50 ms), and at 5 ms this producer made most of herald.events' batches.
LOAD_LINGER_MS = 50

# (payload, reason it must be dead-lettered with)
MALFORMED: tuple[tuple[bytes | None, str], ...] = (
    (b"not json {", "not_json"),
    (b"", "not_json"),
    (None, "not_json"),  # a tombstone
    (b'\xff\xfe{"id": 1}', "not_json"),  # not UTF-8
    (b"[1, 2, 3]", "not_object"),
    (b'"just a string"', "not_object"),
    (b'{"foo": 1}', "unmapped"),
    (b'{"id": "m1", "type": "t", "user_id": "nobody"}', "unmapped"),  # no title
    (b'{"id": "m2", "type": "t", "title": "x", "recipients": []}', "schema"),
    (b'{"id": "m3", "type": "t", "title": "x", "user_id": "u", "target_url": "javascript:x"}', "schema"),
    (b'{"id": "m4", "type": "t", "title": "x", "user_id": "u", "severity": "apocalyptic"}', "schema"),
)


def _poison(i: int) -> tuple[bytes, str]:
    """Records that once crashed a consumer, or could: nesting past the interpreter's stack,
    a value over the size limit."""
    if i % 2 == 0:
        return b"[" * 100_000, "not_json"
    big = {"id": "big", "type": "t", "title": "x", "user_id": "u", "body": "x" * 300_000}
    return json.dumps(big).encode(), "too_large"


@dataclass(frozen=True)
class Note:
    """One notification a record must produce."""

    user: str
    key: str
    severity: str


@dataclass
class Sent:
    """One record as sent: its bytes, where it went, and what it must become."""

    kind: str
    value: bytes | None
    headers: KafkaHeaders
    notes: tuple[Note, ...] = ()
    dlq_reason: str | None = None
    via_receiver: bool = False
    duplicate: bool = False
    sent_at: float = 0.0
    # Set when the broker (or the receiver's 202) acknowledged it: (partition, offset).
    position: tuple[int, int] | None = None
    # The receiver did not answer 202 (down, killed mid-request): it may or may not be stored.
    unconfirmed: bool = False
    # Still queued for the receiver when the load stopped: never sent.
    dropped: bool = False


@dataclass(frozen=True)
class UserPlan:
    user: str
    in_app: bool
    channels: frozenset[str]
    digest_minutes: int | None  # None: the default
    # Endpoints per channel: "ok" (a peer that accepts), "reject" (a webhook that answers 422),
    # or none at all (the delivery is skipped: no_endpoint).
    endpoints: dict[str, str] = field(default_factory=dict)


def plan_users(rng: random.Random, count: int) -> list[UserPlan]:
    plans = []
    for i in range(count):
        channels = frozenset(c for c in ("email", "push", "webhook") if rng.random() < 0.45)
        endpoints: dict[str, str] = {}
        for c in sorted(channels):
            roll = rng.random()
            if roll < 0.08:
                continue  # enabled, but no endpoint
            endpoints[c] = "reject" if c == "webhook" and roll < 0.16 else "ok"
        plans.append(
            UserPlan(
                user=f"u{i:04d}",
                in_app=rng.random() >= 0.1,
                channels=channels,
                digest_minutes=0 if rng.random() < 0.1 else None,
                endpoints=endpoints,
            )
        )
    return plans


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def skey(source: str, event_id: str) -> str:
    return f"s:{len(source)}:{source}:{event_id}"


def rkey(event_type: str, resource: str) -> str:
    return f"r:{len(event_type)}:{event_type}:{resource}"


class Generator:
    """The stream of records, one at a time, each with what it must become."""

    def __init__(self, rng: random.Random, users: Sequence[UserPlan]) -> None:
        self._rng = rng
        self._users = [u.user for u in users]
        self._n = 0
        self._history: list[Sent] = []  # valid records sent, for duplicates
        self._invoice_owner: dict[str, str] = {}  # an invoice belongs to one customer

    def next(self, now: float) -> Sent:
        rng = self._rng
        self._n += 1
        if self._history and rng.random() < DUPLICATE_SHARE:
            return self._duplicate(rng.choice(self._history[-5000:]), now)
        kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
        make: dict[str, Callable[[float], Sent]] = {
            "native": self._native,
            "receiver": self._receiver,
            "cloudevent": self._cloudevent,
            "stripe": self._stripe,
            "github": self._github,
            "malformed": self._malformed,
            "poison": self._poison,
        }
        sent = make[kind](now)
        sent.sent_at = now
        if sent.dlq_reason is None:
            self._history.append(sent)
        return sent

    def _duplicate(self, orig: Sent, now: float) -> Sent:
        """The same record again (an upstream retry); a native one through the bus or the
        receiver (whatever way the first copy came), others with their headers on the bus."""
        via = orig.kind == "native" and self._rng.random() < 0.3
        return Sent(orig.kind, orig.value, orig.headers, orig.notes, None, via, True, now)

    def _user(self) -> str:
        return self._rng.choice(self._users)

    def _severity(self) -> str:
        return self._rng.choices(SEVERITIES, SEVERITY_WEIGHTS)[0]

    def _native_doc(self, now: float, source: str = EVENT_SOURCE) -> tuple[dict[str, Any], tuple[Note, ...]]:
        rng = self._rng
        severity = self._severity()
        event_id = f"e{self._n}"
        doc: dict[str, Any] = {
            "id": event_id,
            "source": source,
            "type": f"chaos.{severity}",
            "title": f"Chaos event {self._n}",
            "severity": severity,
            "occurred_at": _iso(now),
            "target_url": f"/chaos/{self._n}",
        }
        if severity == "warning":
            doc["batch_key"] = f"batch-{rng.randrange(3)}"
        roll = rng.random()
        if roll < 0.1:
            doc["idempotency_key"] = f"idem-{self._n}"
            key = f"k:idem-{self._n}"
        elif roll < 0.25:
            # A resource that fails again later (a new event id, the same notification).
            resource = f"res-{rng.randrange(max(1, self._n // 4))}"
            doc["resource_id"] = resource
            key = rkey(doc["type"], resource)
        else:
            key = skey(source, event_id)
        if rng.random() < 0.05:
            users = sorted(set(rng.sample(self._users, 3)))
            doc["recipients"] = users
        else:
            users = [self._user()]
            doc["user_id"] = users[0]
        if rng.random() < 0.2:
            doc["body"] = "Card 4242 4242 4242 4242 declined; write to ops@example.com"
            doc["sensitive"] = rng.random() < 0.5
        return doc, tuple(Note(u, key, severity) for u in users)

    def _native(self, now: float) -> Sent:
        doc, notes = self._native_doc(now)
        return Sent("native", json.dumps(doc).encode(), [], notes)

    def _receiver(self, now: float) -> Sent:
        doc, notes = self._native_doc(now, HOOK_SOURCE)
        return Sent("native", json.dumps(doc).encode(), [], notes, via_receiver=True)

    def _cloudevent(self, now: float) -> Sent:
        severity = self._severity()
        user = self._user()
        ce_id = f"ce{self._n}"
        source = "/chaos/jobs"
        data = {"title": f"CloudEvent {self._n}", "user_id": user, "severity": severity}
        if severity == "warning":
            data["batch_key"] = "jobs"
        notes = (Note(user, skey(source, ce_id), severity),)
        if self._rng.random() < 0.5:  # structured mode
            doc = {
                "specversion": "1.0",
                "id": ce_id,
                "source": source,
                "type": f"chaos.job.{severity}",
                "time": _iso(now),
                "datacontenttype": "application/json",
                "data": data,
            }
            headers: KafkaHeaders = [("content-type", b"application/cloudevents+json")]
            return Sent("cloudevent", json.dumps(doc).encode(), headers, notes)
        binary: KafkaHeaders = [
            ("ce_specversion", b"1.0"),
            ("ce_id", ce_id.encode()),
            ("ce_source", source.encode()),
            ("ce_type", f"chaos.job.{severity}".encode()),
            ("ce_time", _iso(now).encode()),
            ("content-type", b"application/json"),
        ]
        return Sent("cloudevent", json.dumps(data).encode(), binary, notes)

    def _stripe(self, now: float) -> Sent:
        """Stripe's invoice.payment_failed: critical, one notification per invoice (a retry of
        the same invoice, with a new event id, is the same notification)."""
        invoice = f"in_{self._rng.randrange(max(1, self._n // 3))}"
        customer = self._invoice_owner.setdefault(invoice, self._user())
        doc = {
            "id": f"evt_{self._n}",
            "object": "event",
            "type": "invoice.payment_failed",
            "created": int(now),
            "data": {
                "object": {
                    "id": invoice,
                    "object": "invoice",
                    "customer": customer,
                    "number": f"INV-{invoice}",
                    "hosted_invoice_url": f"https://pay.example/{invoice}",
                }
            },
        }
        key = rkey("invoice.payment_failed", invoice)
        return Sent("stripe", json.dumps(doc).encode(), [], (Note(customer, key, "critical"),))

    def _github(self, now: float) -> Sent:
        """GitHub's issue_comment: an info note to the issue's author, a warning to each
        @mention; never to the commenter (the shipped rule's ``exclude``)."""
        rng = self._rng
        author, commenter, *mentioned = rng.sample(self._users, 2 + rng.randrange(3))
        comment = str(100_000 + self._n)
        doc = {
            "action": "created",
            "issue": {"number": rng.randrange(1, 500), "title": "Flaky build", "user": {"login": author}},
            "comment": {
                "id": int(comment),
                "created_at": _iso(now),
                "body": " ".join(f"@{m}" for m in mentioned) + " could you look?",
                "user": {"login": commenter},
                "html_url": f"https://github.com/acme/app/issues/1#issuecomment-{comment}",
            },
            "repository": {"full_name": "acme/app"},
        }
        headers: KafkaHeaders = [
            ("X-GitHub-Event", b"issue_comment"),
            ("X-GitHub-Delivery", f"gh-{self._n}".encode()),
        ]
        notes = [Note(author, rkey("github.issue_comment", comment), "info")]
        notes += [Note(m, rkey("github.mention", comment), "warning") for m in mentioned]
        return Sent("github", json.dumps(doc).encode(), headers, tuple(notes))

    def _malformed(self, now: float) -> Sent:
        value, reason = self._rng.choice(MALFORMED)
        return Sent("malformed", value, [], (), reason)

    def _poison(self, now: float) -> Sent:
        value, reason = _poison(self._n)
        return Sent("poison", value, [], (), reason)


class Load:
    """Sends the generator's records at ``rate`` per second until stopped: straight onto the
    events topic (one producer, acknowledged by the broker), and, for the receiver's share,
    signed through the webhook receiver by ``posters`` threads that retry a refused request
    the way a webhook sender does (for up to ``retry_s``)."""

    def __init__(
        self,
        settings: Settings,
        generator: Generator,
        *,
        rate: float,
        receiver_url: str,
        events_topic: str,
        posters: int = 8,
        retry_s: float = 20.0,
    ) -> None:
        self._settings = settings
        self._gen = generator
        self._rate = rate
        self._topic = events_topic
        self._receiver_url = receiver_url
        self._retry_s = retry_s
        self.sent: list[Sent] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._queue: queue.Queue[Sent | None] = queue.Queue(maxsize=10_000)
        self._scheme = scheme_for(settings.receiver.sources[RECEIVER_SOURCE])
        self._threads = [threading.Thread(target=self._produce, name="chaos-load", daemon=True)]
        self._threads += [
            threading.Thread(target=self._post, name=f"chaos-post-{i}", daemon=True) for i in range(posters)
        ]
        self.receiver_refusals = 0
        self._lock = threading.Lock()
        self._give_up_at = float("inf")

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop sending; returns once every record is acknowledged or given up on. Requests
        still queued for the receiver ``grace_s`` after the stop are dropped (never sent),
        and retries stop then: a dead receiver must not hold the run for hours."""
        self._give_up_at = time.monotonic() + grace_s
        self._stop.set()
        self._threads[0].join()
        for _ in self._threads[1:]:
            self._queue.put(None)
        for t in self._threads[1:]:
            t.join()

    def _produce(self) -> None:
        producer = Producer(
            producer_config(self._settings, **{"linger.ms": LOAD_LINGER_MS}), logger=KAFKA_LOG
        )
        started = time.time()
        made = 0

        def acked(sent: Sent) -> Callable[[KafkaError | None, Message], None]:
            def cb(err: KafkaError | None, msg: Message) -> None:
                if err is None:
                    sent.position = (msg.partition() or 0, msg.offset() or 0)
                else:
                    self.failures.append(str(err))

            return cb

        while not self._stop.is_set():
            now = time.time()
            due = int((now - started) * self._rate)
            while made < due:
                sent = self._gen.next(now)
                made += 1
                self.sent.append(sent)
                if sent.via_receiver:
                    self._queue.put(sent)
                    continue
                while True:
                    try:
                        producer.produce(
                            self._topic, value=sent.value, headers=sent.headers, on_delivery=acked(sent)
                        )
                        break
                    except BufferError:
                        producer.poll(0.05)
                if sent.dlq_reason is not None:
                    sent.value = None  # never sent again: a 300 KB poison record is not kept
            producer.poll(0)
            time.sleep(0.005)
        if producer.flush(120):
            self.failures.append("records still unacknowledged two minutes after the load stopped")

    def _post(self) -> None:
        client = ReceiverClient(self._receiver_url, timeout=10)
        try:
            while (sent := self._queue.get()) is not None:
                if time.monotonic() > self._give_up_at:
                    sent.dropped = True  # never sent: it counts for nothing
                    continue
                self._post_one(client, sent)
        finally:
            client.close()

    def _post_one(self, client: ReceiverClient, sent: Sent) -> None:
        body = sent.value or b""
        deadline = time.monotonic() + self._retry_s
        msg_id = f"msg_{id(sent)}_{sent.sent_at}"
        while True:
            headers = {"Content-Type": "application/json", **self._scheme.sign(body, event_id=msg_id)}
            try:
                status, _, data = client.post(f"/webhooks/{RECEIVER_SOURCE}", body, headers)
            except HeraldError:
                status, data = 0, b""
            if status == 202:
                reply = json.loads(data)
                sent.position = (int(reply["partition"]), int(reply["offset"]))
                sent.unconfirmed = False
                return
            # Down, killed mid-request, or 503 (broker trouble): it may have been stored.
            sent.unconfirmed = True
            with self._lock:
                self.receiver_refusals += 1
            if time.monotonic() > min(deadline, self._give_up_at):
                return  # given up on, as a sender would: it counts only if it was stored
            time.sleep(0.5)
