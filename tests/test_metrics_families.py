"""Each metric family of core/metrics.py is present and moves as the records say, in an
integration run of the process that owns it (the session's broker and PostgreSQL, each
process in-process so the global registry can be read):

- the batch loop: consumed, processed and failed by topic; dead letters by topic and reason;
  batch and commit durations; retries for PostgreSQL away, a wrong environment, the broker
  not acknowledging; batches dropped when the group took the partitions;
- ``herald ingest``: outcomes, records published by kind, content keys, the outbox relay;
- ``herald deliver`` (webhook, email, push): outcomes, sends and status classes, latency,
  retries, dead letters, deferrals, skips, disabled endpoints, the circuit breaker, sends in
  flight and abandoned at shutdown;
- ``herald digest``, ``herald api`` (and its live stream), ``herald receiver`` and
  ``herald lag-exporter``: each of their own families.

Every assertion compares a labelled sample before and after the run: an earlier test
moving the same counter cannot make one pass. A last, cheap test checks that README.md
documents every family."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

import consumers.digest
from config.settings import Settings
from consumers.ingest import IngestHandler
from consumers.lag_exporter import LagExporter
from consumers.loop import BatchLoop, Stopper
from consumers.offsets import Kafka, LagReader
from core import metrics
from core.http import Health
from herald.embedded import free_port
from herald.inspect import committed, read_topic, wait_committed
from producers.publisher import KafkaPublisher, OutRecord
from producers.topics import Topics, ensure_topics
from storage import stream
from storage.db import Database
from tests.api_support import (
    AUDIENCE,
    JWT_SECRET,
    add_notifications,
    api_settings,
    client,
    running_api,
    token,
)
from tests.conftest import Backend
from tests.helpers import ROOT, event, ingest, last_offsets, make_settings, produce, start_ingest
from tests.ops_support import new_group, produce_single, set_offsets
from tests.push_peer import PushPeer
from tests.receiver_helpers import Client, receiver_settings, running_receiver
from tests.smtp_peer import SmtpPeer
from tests.stream_support import SseClient
from tests.test_bus import SHIPPED, sample
from tests.test_deliver import (
    SECRET,
    critical,
    deliver_settings,
    final,
    peer,
    send_events,
    start_deliver,
    user_with,
    wait_until,
)
from tests.test_digest import (
    WINDOW_S,
    Pipeline,
    all_closed,
    current_window,
    pipeline_for,
    warnings,
    windows,
)
from tests.test_email import email_settings, mailbox, smtp
from tests.test_outbox_relay import strand
from tests.test_push import push, push_settings, subscribed
from tests.test_receiver import envelope, sign
from tests.webhook_peer import WebhookPeer, start_peer

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]
AGE_S = 30
__all__ = ["peer", "pipeline_for", "push", "smtp"]  # fixtures


@pytest.fixture
def dsettings(backend: Backend) -> Settings:
    return deliver_settings(backend)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_consumer_families_move_with_the_records(db: Conn, dsettings: Settings, peer: WebhookPeer) -> None:
    s = dsettings
    topics = Topics(s.topic_prefix)
    delivery_topic = topics.deliveries("webhook")
    user_with(db, s, "fam-ok", peer.url("/ok"))
    user_with(db, s, "fam-refused", peer.url("/status/400"))
    user_with(db, s, "fam-flaky", peer.url("/flaky/1"))
    names = [
        ("herald_records_consumed_total", {"consumer": "ingest", "topic": topics.events}),
        ("herald_records_processed_total", {"consumer": "ingest", "topic": topics.events}),
        ("herald_records_failed_total", {"consumer": "ingest", "topic": topics.events}),
        ("herald_dlq_records_total", {"topic": topics.events_dlq, "reason": "not_json"}),
        ("herald_batch_seconds_count", {"consumer": "ingest"}),
        ("herald_commit_seconds_count", {"consumer": "ingest"}),
        ("herald_records_consumed_total", {"consumer": "deliver-webhook", "topic": delivery_topic}),
        ("herald_records_processed_total", {"consumer": "deliver-webhook", "topic": delivery_topic}),
        ("herald_records_failed_total", {"consumer": "deliver-webhook", "topic": delivery_topic}),
        ("herald_dlq_records_total", {"topic": topics.deliveries_dlq("webhook"), "reason": "permanent"}),
        ("herald_batch_seconds_count", {"consumer": "deliver-webhook"}),
        ("herald_deliver_outcomes_total", {"channel": "webhook", "outcome": "sent"}),
        ("herald_deliver_outcomes_total", {"channel": "webhook", "outcome": "retry"}),
        ("herald_deliver_outcomes_total", {"channel": "webhook", "outcome": "dlq"}),
        ("herald_deliver_responses_total", {"channel": "webhook", "status_class": "2xx"}),
        ("herald_deliver_responses_total", {"channel": "webhook", "status_class": "4xx"}),
        ("herald_deliver_responses_total", {"channel": "webhook", "status_class": "5xx"}),
        ("herald_delivery_latency_seconds_count", {"channel": "webhook", "severity": "critical"}),
        ("herald_delivery_latency_seconds_count", {"channel": "webhook", "severity": "warning"}),
        ("herald_delivery_latency_seconds_sum", {"channel": "webhook", "severity": "critical"}),
        ("herald_delivery_latency_seconds_sum", {"channel": "webhook", "severity": "warning"}),
    ]
    before = {(n, tuple(sorted(labels.items()))): value(n, **labels) for n, labels in names}

    db.execute("UPDATE notification_preferences SET digest_minutes = 0 WHERE user_id = 'fam-ok'")
    values = [
        json.dumps(critical("fam-ok")).encode(),
        json.dumps(event(user_id="fam-ok", severity="warning")).encode(),
        json.dumps(critical("fam-refused")).encode(),
        json.dumps(critical("fam-flaky")).encode(),
        b"not json",
    ]
    # Stamped 30 s ago on the events topic: the end-to-end latency counts from there, not
    # from the delivery record ingest wrote.
    started = time.time()
    stamp = int((started - AGE_S) * 1000)
    ensure_topics(s, topics.ingest_topics())
    offsets = produce_single(s, topics.events, values, timestamps_ms=[stamp] * len(values))
    ingest(s, [(topics.events, 0, o) for o in offsets])
    runner = start_deliver(s)
    try:
        wait_until(final(db, "fam-ok", 2), what="fam-ok's two deliveries sent")
        wait_until(final(db, "fam-refused"), what="fam-refused's delivery dead-lettered")
        wait_until(final(db, "fam-flaky"), what="fam-flaky's delivery sent on its second try", timeout=30)
    finally:
        runner.stop()
    elapsed = time.time() - started

    got = {key: value(key[0], **dict(key[1])) - was for key, was in before.items()}

    def delta(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    events = {"consumer": "ingest", "topic": topics.events}
    assert delta("herald_records_consumed_total", **events) == 5
    assert delta("herald_records_processed_total", **events) == 5
    assert delta("herald_records_failed_total", **events) == 1
    assert delta("herald_dlq_records_total", topic=topics.events_dlq, reason="not_json") == 1
    assert delta("herald_batch_seconds_count", consumer="ingest") >= 1
    assert delta("herald_commit_seconds_count", consumer="ingest") >= 1

    # 4 deliveries, one of them read twice (its retry record, from the retry topic).
    deliver = {"consumer": "deliver-webhook", "topic": delivery_topic}
    assert delta("herald_records_consumed_total", **deliver) == 4
    assert delta("herald_records_processed_total", **deliver) == 4
    assert delta("herald_records_failed_total", **deliver) == 1
    assert delta("herald_dlq_records_total", topic=topics.deliveries_dlq("webhook"), reason="permanent") == 1
    assert delta("herald_batch_seconds_count", consumer="deliver-webhook") >= 2
    outcome = {
        o: delta("herald_deliver_outcomes_total", channel="webhook", outcome=o)
        for o in ("sent", "retry", "dlq")
    }
    assert outcome == {"sent": 3, "retry": 1, "dlq": 1}
    classes = {
        c: delta("herald_deliver_responses_total", channel="webhook", status_class=c)
        for c in ("2xx", "4xx", "5xx")
    }
    assert classes == {"2xx": 3, "4xx": 1, "5xx": 1}
    assert delta("herald_delivery_latency_seconds_count", channel="webhook", severity="critical") == 2
    assert delta("herald_delivery_latency_seconds_count", channel="webhook", severity="warning") == 1
    for severity, n in (("critical", 2), ("warning", 1)):
        spent = delta("herald_delivery_latency_seconds_sum", channel="webhook", severity=severity)
        assert AGE_S * n <= spent <= (AGE_S + elapsed) * n, "from the event's record timestamp to acceptance"


# -- every family: before/after of labelled samples --------------------------------------------

Sample = tuple[str, tuple[tuple[str, str], ...]]


def _key(name: str, labels: dict[str, str]) -> Sample:
    return name, tuple(sorted(labels.items()))


class Moves:
    """Labelled samples read before a run; ``delta`` says how far each moved since, and fails
    when the sample is not exported at all (the family must be present, not just still)."""

    def __init__(self, *samples: tuple[str, dict[str, str]]) -> None:
        self._before = {_key(n, labels): value(n, **labels) for n, labels in samples}

    def delta(self, name: str, **labels: str) -> float:
        """How far it moved; the sample must be exported."""
        assert REGISTRY.get_sample_value(name, labels) is not None, f"{name}{labels} is not exported"
        return self.so_far(name, **labels)

    def so_far(self, name: str, **labels: str) -> float:
        """How far it moved, 0 while it is not exported yet (for waits)."""
        key = _key(name, labels)
        assert key in self._before, f"{name}{labels} was not read before the run"
        return value(name, **labels) - self._before[key]


def gauge(name: str, **labels: str) -> float:
    got = REGISTRY.get_sample_value(name, labels)
    assert got is not None, f"{name}{labels} is not exported"
    return got


# -- herald ingest's own -----------------------------------------------------------------------

INGEST_OUTCOMES = ("inserted", "duplicate", "invalid", "rate_limited", "hidden")


def test_ingest_families_move_with_the_outcomes(db: Conn, backend: Backend) -> None:
    """One run of each outcome, a mapped record with no id (content key), a rate limit that
    folds a critical into the digest, and rows stranded before the run for the relay."""
    s = make_settings(
        backend.bootstrap,
        backend.database_url,
        policy={"webhook": True, "rate_limits": {"webhook": 1}},
        rules_file=SHIPPED,
        outbox_relay_every_s=0.2,
        outbox_relay_after_s=1.0,
    )
    # Stranded under another prefix: committed rows whose publish failed, aged 600 s.
    strand(s.model_copy(update={"topic_prefix": s.topic_prefix + "x"}), db, 3)
    stranded = db.execute("SELECT count(*) FROM deliveries WHERE published_at IS NULL").fetchone()
    assert stranded is not None and stranded[0] == 6  # 3 events, each to email and webhook
    db.execute("INSERT INTO notification_preferences (user_id, in_app) VALUES ('ing-muted', false)")
    moves = Moves(
        *[("herald_ingest_events_total", {"outcome": o}) for o in INGEST_OUTCOMES],
        ("herald_records_published_total", {"kind": "delivery", "channel": "webhook"}),
        ("herald_records_published_total", {"kind": "digest", "channel": ""}),
        ("herald_ingest_content_keys_total", {}),
        ("herald_outbox_relayed_total", {}),
    )
    twice = event(user_id="ing-warned", severity="warning")
    minute = datetime.now(UTC).isoformat()  # one rate-limit window (event time) for both
    values: list[dict[str, Any] | bytes] = [
        critical("ing-limited", occurred_at=minute),  # one of these two goes out now,
        critical("ing-limited", occurred_at=minute),  # the other is over the limit: into the digest
        twice,
        twice,
        event(user_id="ing-muted", severity="info"),  # in-app off: stored hidden
        b"not json",
        sample("job_failed.json"),  # mapped by the shipped rules; no id: a content key; a warning
    ]
    ingest(s, produce(s, values))

    outcomes = {o: moves.delta("herald_ingest_events_total", outcome=o) for o in INGEST_OUTCOMES}
    assert outcomes == {"inserted": 5, "duplicate": 1, "invalid": 1, "rate_limited": 1, "hidden": 1}
    assert moves.delta("herald_records_published_total", kind="delivery", channel="webhook") == 1
    # The rate-limited critical, the warning and the job's warning.
    assert moves.delta("herald_records_published_total", kind="digest", channel="") == 3
    assert moves.delta("herald_ingest_content_keys_total") == 1
    assert moves.delta("herald_outbox_relayed_total") == stranded[0]
    unpublished = db.execute("SELECT count(*) FROM deliveries WHERE published_at IS NULL").fetchone()
    assert unpublished == (0,)


# -- the batch loop's retries and dropped batches ----------------------------------------------


def test_loop_counts_database_retries_by_kind(db: Conn, backend: Backend) -> None:
    """PostgreSQL busy (a lock held past the statement timeout), then wrongly set up (the
    table gone): each retry counted in its own family; the batch lands once it is fixed."""
    s = make_settings(backend.bootstrap, backend.database_url, db_statement_timeout_ms=300)
    events = {"consumer": "ingest", "topic": Topics(s.topic_prefix).events}
    ing, database = {"consumer": "ingest"}, {"consumer": "ingest", "system": "database"}
    moves = Moves(
        ("herald_db_unavailable_total", ing),
        ("herald_environment_errors_total", database),
        ("herald_records_processed_total", events),
    )
    positions = produce(s, [event(user_id="loop-db", title=f"held {i}") for i in range(3)], key=b"one")
    runner = None
    try:
        try:
            with psycopg.connect(backend.database_url) as locker:
                locker.execute("LOCK TABLE notifications IN ACCESS EXCLUSIVE MODE")
                runner = start_ingest(s)
                wait_until(
                    lambda: moves.so_far("herald_db_unavailable_total", **ing) >= 1,
                    what="a retry for the lock",
                )
                assert moves.so_far("herald_environment_errors_total", **database) == 0
                locker.execute("ALTER TABLE notifications RENAME TO notifications_away")
                locker.commit()
                outages = moves.delta("herald_db_unavailable_total", **ing)
                wait_until(
                    lambda: moves.so_far("herald_environment_errors_total", **database) >= 1,
                    what="a retry for the missing table",
                )
                assert moves.so_far("herald_records_processed_total", **events) == 0, "nothing committed yet"
        finally:
            db.execute("ALTER TABLE IF EXISTS notifications_away RENAME TO notifications")
        wait_committed(s, runner.group, last_offsets(positions), timeout=30)
    finally:
        if runner is not None:
            runner.stop()
    assert moves.delta("herald_records_processed_total", **events) == 3
    # The statement waiting on the lock may time out as the table goes: one outage at most.
    assert moves.delta("herald_db_unavailable_total", **ing) - outages <= 1, "a missing table is no outage"


def test_loop_counts_broker_retries(db: Conn, backend: Backend) -> None:
    """The ingest handler's publisher gets no acknowledgement (its broker is a closed port):
    each retry of the batch is a broker retry, neither a database nor an environment one."""
    s = make_settings(backend.bootstrap, backend.database_url, policy={"webhook": True})
    topics = Topics(s.topic_prefix)
    ing = {"consumer": "ingest"}
    moves = Moves(
        ("herald_broker_unavailable_total", ing),
        ("herald_db_unavailable_total", ing),
        ("herald_environment_errors_total", {"consumer": "ingest", "system": "broker"}),
        ("herald_records_processed_total", {"consumer": "ingest", "topic": topics.events}),
    )
    produce(s, [event(user_id="loop-broker", severity="critical")])
    nowhere = s.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    publisher = KafkaPublisher(nowhere, flush_timeout=1.0, **{"message.timeout.ms": 500, "log_level": 0})
    database = Database.from_settings(s)
    loop = BatchLoop(
        s,
        name="ingest",
        group=new_group("fam-broker"),
        topics=[topics.events],
        handler=IngestHandler(s, database, publisher, topics),
    )
    runner = threading.Thread(target=loop.run, kwargs={"timeout": 30}, daemon=True)
    runner.start()
    try:
        wait_until(
            lambda: moves.so_far("herald_broker_unavailable_total", **ing) >= 2, what="two broker retries"
        )
    finally:
        loop.stopper.set()
        runner.join(30)
        publisher.close()
        database.close()
    assert not runner.is_alive()
    assert moves.delta("herald_broker_unavailable_total", **ing) >= 2
    assert moves.so_far("herald_db_unavailable_total", **ing) == 0
    assert moves.so_far("herald_environment_errors_total", consumer="ingest", system="broker") == 0
    assert moves.so_far("herald_records_processed_total", consumer="ingest", topic=topics.events) == 0


def test_loop_counts_a_batch_dropped_when_the_group_took_its_partitions(db: Conn, backend: Backend) -> None:
    """The member's session expires while its batch waits on PostgreSQL (heartbeats further
    apart than the session): the commit is refused, the batch dropped uncommitted and counted;
    nothing is committed for it."""
    lost_settings = make_settings(
        backend.bootstrap,
        backend.database_url,
        session_timeout_ms=1000,
        kafka={"heartbeat.interval.ms": "5000"},
    )
    topics = Topics(lost_settings.topic_prefix)
    events = {"consumer": "ingest", "topic": topics.events}
    moves = Moves(
        ("herald_assignment_lost_total", {"consumer": "ingest"}),
        ("herald_records_processed_total", events),
        ("herald_ingest_events_total", {"outcome": "inserted"}),
    )
    positions = produce(lost_settings, [event(user_id="loop-lost") for _ in range(3)], key=b"one")
    group = new_group("fam-lost")
    with psycopg.connect(backend.database_url) as locker:
        locker.execute("LOCK TABLE notifications IN ACCESS EXCLUSIVE MODE")
        runner = start_ingest(lost_settings, group)
        try:
            wait_until(lambda: inserts_waiting(db) > 0, what="the batch waiting on the lock")
            time.sleep(1.5)  # past the 1 s session: the group no longer counts this member
            locker.rollback()
            wait_until(
                lambda: moves.so_far("herald_assignment_lost_total", consumer="ingest") >= 1,
                what="a lost batch",
            )
        finally:
            locker.rollback()
            runner.stop()
    assert moves.delta("herald_assignment_lost_total", consumer="ingest") == 1
    assert moves.so_far("herald_records_processed_total", **events) == 0
    assert moves.delta("herald_ingest_events_total", outcome="inserted") == 3, "stored, then dropped"
    partitions = {(t, p) for t, p, _ in positions}
    assert all(o < 0 for o in committed(lost_settings, group, partitions).values()), "dropped uncommitted"


def inserts_waiting(db: Conn) -> int:
    """Sessions whose insert into notifications waits for a lock (a batch, not the relay)."""
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO notifications %%'"
    ).fetchone()
    return int(str(row[0])) if row else 0


# -- herald deliver's own ----------------------------------------------------------------------

SEND_OUTCOMES = ("ok", "transient", "permanent", "gone")
STATUS_OF_OUTCOME = {"ok": 200, "transient": 503, "permanent": 400, "gone": 410}
STATUS_CLASSES = ("2xx", "4xx", "5xx")
DEAD_REASONS = ("permanent", "endpoint_gone", "exhausted")
CIRCUIT_STATES = ("closed", "open", "half_open")
CHANGES = "herald_deliver_circuit_changes_total"


def test_deliver_families_move_with_the_sends(db: Conn, backend: Backend, peer: WebhookPeer) -> None:
    """Sends of every outcome, a retry (deferred until due), a 410, a duplicate record, a host
    whose circuit opens, holds and closes again, and a send abandoned at shutdown."""
    s = deliver_settings(
        backend,
        delivery={"retry_tiers": ["1s", "2s"], "max_attempts": 3, "lease_s": 30, "rebalance_grace_s": 0.2},
        # Opens only when every send in the window failed (the shared peer's one 503 never opens
        # it); the cool-down outlasts the first retry tier, so the retries come back to a closed door.
        breaker={"min_attempts": 2, "failure_ratio": 1.0, "window_s": 60, "cooldown_s": 2},
        webhook={"timeout_s": 30.0, "allow_private_targets": True},
    )
    hook = {"channel": "webhook"}
    moves = Moves(
        *[("herald_deliver_sends_total", {**hook, "outcome": o}) for o in SEND_OUTCOMES],
        *[("herald_deliver_responses_total", {**hook, "status_class": c}) for c in STATUS_CLASSES],
        ("herald_deliver_send_seconds_count", hook),
        *[("herald_deliver_retried_total", {**hook, "tier": t}) for t in s.delivery.retry_tiers],
        *[("herald_deliver_dead_letters_total", {**hook, "reason": r}) for r in DEAD_REASONS],
        ("herald_deliver_deferred_total", {**hook, "why": "due"}),
        ("herald_deliver_skipped_total", {**hook, "reason": "sent"}),
        ("herald_deliver_endpoints_disabled_total", hook),
        ("herald_deliver_held_total", hook),
        *[("herald_deliver_circuit_changes_total", {**hook, "state": c}) for c in CIRCUIT_STATES],
        ("herald_deliver_abandoned_total", hook),
    )
    down, stuck = start_peer(SECRET), start_peer(SECRET, hang_s=60)
    users = {"d-ok": 1, "d-refused": 1, "d-gone": 1, "d-flaky": 1, "d-down": 2, "d-hang": 1}
    runner = start_deliver(s)  # joins while ingest runs
    try:
        user_with(db, s, "d-ok", peer.url("/ok"))
        user_with(db, s, "d-refused", peer.url("/status/400"))
        user_with(db, s, "d-gone", peer.url("/status/410"))
        user_with(db, s, "d-flaky", peer.url("/flaky/1"))
        user_with(db, s, "d-down", down.url("/switch"))
        user_with(db, s, "d-hang", stuck.url("/hang"))  # answers long after the test
        down.down.set()
        send_events(s, *(critical(u) for u, n in users.items() for _ in range(n)))

        # The down host: two failures of two open its circuit; its retries are held, not tried.
        wait_until(lambda: moves.so_far(CHANGES, **hook, state="open") >= 1, what="the circuit open")
        assert gauge("herald_deliver_circuits", **hook, state="open") == 1
        wait_until(
            lambda: moves.so_far("herald_deliver_held_total", **hook) >= 1, what="a held delivery", timeout=10
        )
        down.down.clear()  # the probe after the cool-down passes

        # The same delivery record again, once sent: its row is final, so it is skipped.
        wait_until(final(db, "d-ok"), what="d-ok's delivery sent")
        republish(s, "d-ok")
        for user, n in users.items():
            if user != "d-hang":
                wait_until(final(db, user, n), what=f"{user}'s deliveries final")
        wait_until(
            lambda: moves.so_far("herald_deliver_skipped_total", **hook, reason="sent") >= 1, what="the skip"
        )
        assert gauge("herald_deliver_circuits", **hook, state="open") == 0
        assert gauge("herald_deliver_circuits", **hook, state="closed") == 2, "the two hosts that answered"
        # Only the hanging send is left in flight, until the shutdown gives it up past the grace.
        wait_until(lambda: gauge("herald_deliver_in_flight", **hook) == 1, what="one send in flight")
        assert len(stuck.at("/hang")) == 1
    finally:
        runner.stop()
        down.close()
        stuck.close()
    assert gauge("herald_deliver_in_flight", **hook) == 0
    assert moves.delta("herald_deliver_abandoned_total", **hook) == 1

    # Sends and status classes: exactly what the peers answered (the abandoned send aside).
    answered = Counter(r.answered for p in (peer, down) for r in p.received)
    sends = {o: moves.delta("herald_deliver_sends_total", **hook, outcome=o) for o in SEND_OUTCOMES}
    assert sends == {o: answered[code] for o, code in STATUS_OF_OUTCOME.items()}
    assert sends["ok"] == 4 and sends["permanent"] == sends["gone"] == 1 and sends["transient"] >= 3
    classes = {
        c: moves.delta("herald_deliver_responses_total", **hook, status_class=c) for c in STATUS_CLASSES
    }
    assert classes == {"2xx": sends["ok"], "4xx": 2, "5xx": sends["transient"]}
    assert moves.delta("herald_deliver_send_seconds_count", **hook) == sum(sends.values())

    # Each transient send went to a retry tier, unless it was the last attempt.
    first, second = s.delivery.retry_tiers
    retried = moves.delta("herald_deliver_retried_total", **hook, tier=first)
    retried += moves.so_far("herald_deliver_retried_total", **hook, tier=second)
    exhausted = moves.so_far("herald_deliver_dead_letters_total", **hook, reason="exhausted")
    assert retried >= 3 and retried + exhausted == sends["transient"]
    assert moves.delta("herald_deliver_dead_letters_total", **hook, reason="permanent") == 1
    assert moves.delta("herald_deliver_dead_letters_total", **hook, reason="endpoint_gone") == 1
    assert moves.delta("herald_deliver_endpoints_disabled_total", **hook) == 1
    assert moves.delta("herald_deliver_deferred_total", **hook, why="due") >= 1
    assert moves.delta("herald_deliver_skipped_total", **hook, reason="sent") == 1

    # The circuit: opened (again after each failed probe), half-open once per probe, closed once.
    assert moves.delta("herald_deliver_held_total", **hook) >= 1
    changes = {c: moves.delta(CHANGES, **hook, state=c) for c in CIRCUIT_STATES}
    assert changes["closed"] == 1 and changes["open"] == changes["half_open"] >= 1, changes


def republish(settings: Settings, user: str) -> None:
    """Produce ``user``'s delivery record again, as a replay would."""
    topic = Topics(settings.topic_prefix).deliveries("webhook")
    (rec,) = [r for r in read_topic(settings, topic) if json.loads(r.value or b"{}")["user_id"] == user]
    pub = KafkaPublisher(settings)
    try:
        pub.publish([OutRecord(topic, rec.value, rec.key, list(rec.headers.items()))])
    finally:
        pub.close()


def test_email_and_push_deliverers_count_their_own_sends(
    db: Conn, backend: Backend, smtp: SmtpPeer, push: PushPeer
) -> None:
    """``herald deliver --channel email`` and ``--channel push``, side by side: an accepted and
    a refused send each (SMTP 250 and 550; push 201 and 410), by channel."""
    s = email_settings(
        backend,
        smtp,
        push=push_settings(backend).push,
        policy={"rate_limits": {"email": 100_000, "push": 100_000}},
    )
    topics = Topics(s.topic_prefix)
    mail, web = {"channel": "email"}, {"channel": "push"}
    latency = "herald_delivery_latency_seconds_count"
    moves = Moves(
        *[("herald_deliver_sends_total", {**c, "outcome": o}) for c in (mail, web) for o in SEND_OUTCOMES],
        *[
            ("herald_deliver_responses_total", {**c, "status_class": k})
            for c in (mail, web)
            for k in STATUS_CLASSES
        ],
        *[("herald_deliver_send_seconds_count", c) for c in (mail, web)],
        *[(latency, {**c, "severity": "critical"}) for c in (mail, web)],
        *[
            ("herald_deliver_dead_letters_total", {**c, "reason": r})
            for c in (mail, web)
            for r in DEAD_REASONS
        ],
        *[("herald_deliver_endpoints_disabled_total", c) for c in (mail, web)],
        *[
            ("herald_records_processed_total", {"consumer": f"deliver-{c}", "topic": topics.deliveries(c)})
            for c in ("email", "push")
        ],
    )
    runners = [start_deliver(s, channel=c) for c in ("email", "push")]  # they join while ingest runs
    try:
        mailbox(db, s, "m-ok", "ok@example.org")
        mailbox(db, s, "m-refused", "refuse@example.org")
        subscribed(db, s, "p-ok", push.subscription("ok"))
        subscribed(db, s, "p-gone", push.subscription("gone"))
        send_events(s, *(critical(u) for u in ("m-ok", "m-refused", "p-ok", "p-gone")))
        for user, channel in (
            ("m-ok", "email"),
            ("m-refused", "email"),
            ("p-ok", "push"),
            ("p-gone", "push"),
        ):
            wait_until(final(db, user, 1, channel), what=f"{user}'s {channel} delivery final")
    finally:
        for r in runners:
            r.stop()

    def sends(c: dict[str, str]) -> dict[str, float]:
        return {o: moves.so_far("herald_deliver_sends_total", **c, outcome=o) for o in SEND_OUTCOMES}

    assert sends(mail) == {"ok": 1, "transient": 0, "permanent": 1, "gone": 0}
    assert sends(web) == {"ok": 1, "transient": 0, "permanent": 0, "gone": 1}
    for c, refused in ((mail, "5xx"), (web, "4xx")):
        assert moves.delta("herald_deliver_responses_total", **c, status_class="2xx") == 1
        assert moves.delta("herald_deliver_responses_total", **c, status_class=refused) == 1
        assert moves.delta("herald_deliver_send_seconds_count", **c) == 2
        assert moves.delta(latency, **c, severity="critical") == 1, "only the accepted send has a trip"
    assert moves.delta("herald_deliver_dead_letters_total", **mail, reason="permanent") == 1
    assert moves.delta("herald_deliver_dead_letters_total", **web, reason="endpoint_gone") == 1
    assert moves.delta("herald_deliver_endpoints_disabled_total", **web) == 1
    assert moves.so_far("herald_deliver_endpoints_disabled_total", **mail) == 0, "a 550 disables nothing"
    for channel in ("email", "push"):
        processed = {"consumer": f"deliver-{channel}", "topic": topics.deliveries(channel)}
        assert moves.delta("herald_records_processed_total", **processed) == 2


# -- herald digest's own -----------------------------------------------------------------------


def test_digest_families_move_with_the_windows(
    db: Conn, pipeline_for: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two windows: one sent (three items), one suppressed (all read); the open-windows gauge
    up, then down; an item read again is a duplicate; a sent digest never acknowledged is
    published again by the relay."""
    monkeypatch.setattr(consumers.digest, "OPEN_GAUGE_EVERY_S", 0.2)  # read from PostgreSQL at each tick
    hook = {"channel": "webhook"}
    moves = Moves(
        *[("herald_digest_items_total", {"outcome": o}) for o in ("added", "duplicate")],
        *[("herald_digests_total", {**hook, "outcome": o}) for o in ("sent", "suppressed")],
        ("herald_digest_items_per_digest_count", hook),
        ("herald_digest_items_per_digest_sum", hook),
        ("herald_digest_close_lag_seconds_count", {}),
        ("herald_digest_close_lag_seconds_sum", {}),
        ("herald_digest_republished_total", {}),
    )
    p = pipeline_for(grace_s=1.0)
    start = current_window()
    left = (start + timedelta(seconds=WINDOW_S) - datetime.now(UTC)).total_seconds()
    if left < 1.0:  # time to see both windows open and to read one before they close
        time.sleep(max(left, 0.0))
        start = current_window()
    produce(p.settings, warnings("dg-sent", 3, start) + warnings("dg-read", 2, start))
    wait_until(lambda: value("herald_digest_open_windows") == 2, what="two open windows counted")
    db.execute("UPDATE notifications SET read_at = now() WHERE user_id = 'dg-read'")
    wait_until(all_closed(db, 2), timeout=20, what="both windows closed")
    wait_until(lambda: value("herald_digest_open_windows") == 0, what="no open window counted")
    assert {w["user_id"]: w["status"] for w in windows(db)} == {"dg-sent": "sent", "dg-read": "suppressed"}

    assert moves.delta("herald_digest_items_total", outcome="added") == 5
    assert moves.delta("herald_digests_total", **hook, outcome="sent") == 1
    assert moves.delta("herald_digests_total", **hook, outcome="suppressed") == 1
    assert moves.delta("herald_digest_items_per_digest_count", **hook) == 1
    assert moves.delta("herald_digest_items_per_digest_sum", **hook) == 3, "read items are left out"
    assert moves.delta("herald_digest_close_lag_seconds_count") == 2
    assert 0 <= moves.delta("herald_digest_close_lag_seconds_sum") < 2 * 5, "closed within seconds of due"

    # One item's record again (a replay): known, so a duplicate, and no window changes.
    pending = read_topic(p.settings, Topics(p.settings.topic_prefix).digests_pending)
    again = next(r for r in pending if json.loads(r.value or b"{}")["user_id"] == "dg-sent")
    pub = KafkaPublisher(p.settings)
    try:
        pub.publish([OutRecord(again.topic, again.value, again.key, list(again.headers.items()))])
    finally:
        pub.close()
    wait_until(
        lambda: moves.so_far("herald_digest_items_total", outcome="duplicate") >= 1, what="the duplicate"
    )
    assert moves.delta("herald_digest_items_total", outcome="duplicate") == 1
    assert moves.delta("herald_digest_items_total", outcome="added") == 5

    # The sent digest's record as if never acknowledged (a crash between commit and publish).
    (sent,) = [w["id"] for w in windows(db) if w["status"] == "sent"]
    db.execute(
        "UPDATE deliveries SET published_at = NULL, created_at = now() - interval '1 minute' WHERE id = %s",
        (sent,),
    )
    wait_until(
        lambda: moves.so_far("herald_digest_republished_total") >= 1, what="the digest published again"
    )
    assert moves.delta("herald_digest_republished_total") == 1
    published = db.execute("SELECT published_at IS NOT NULL FROM deliveries WHERE id = %s", (sent,))
    assert published.fetchone() == (True,)


# -- herald api's own, and its live stream -----------------------------------------------------


def test_api_families_move_with_the_requests(backend: Backend, db: Conn) -> None:
    """Requests by route and status, their durations by route, and 401s by reason."""
    moves = Moves(
        *[
            ("herald_api_requests_total", {"route": r, "status": c})
            for r, c in (("list", "200"), ("list", "401"), ("unread_count", "200"), ("read", "404"))
        ],
        *[("herald_api_request_seconds_count", {"route": r}) for r in ("list", "unread_count", "read")],
        *[("herald_api_auth_failures_total", {"reason": r}) for r in ("missing", "expired", "signature")],
    )
    with running_api(api_settings(backend.bootstrap, backend.database_url)) as base:
        with client(base, "api-user") as c:
            assert c.get("/v1/notifications").status_code == 200
            assert c.get("/v1/notifications").status_code == 200
            assert c.get("/v1/notifications/unread-count").status_code == 200
            assert c.post(f"/v1/notifications/{uuid.uuid4()}/read").status_code == 404
        with client(base) as anonymous:
            assert anonymous.get("/v1/notifications").status_code == 401
            expired = {"Authorization": f"Bearer {token('api-user', ttl=-120)}"}
            assert anonymous.get("/v1/notifications", headers=expired).status_code == 401
            forged = {"Authorization": f"Bearer {token('api-user', secret='another-secret-' + 'y' * 32)}"}
            assert anonymous.get("/v1/notifications", headers=forged).status_code == 401

    assert moves.delta("herald_api_requests_total", route="list", status="200") == 2
    assert moves.delta("herald_api_requests_total", route="list", status="401") == 3
    assert moves.delta("herald_api_requests_total", route="unread_count", status="200") == 1
    assert moves.delta("herald_api_requests_total", route="read", status="404") == 1
    assert moves.delta("herald_api_request_seconds_count", route="list") == 5, "answers and refusals alike"
    assert moves.delta("herald_api_request_seconds_count", route="unread_count") == 1
    assert moves.delta("herald_api_request_seconds_count", route="read") == 1
    for reason in ("missing", "expired", "signature"):
        assert moves.delta("herald_api_auth_failures_total", reason=reason) == 1, reason


def test_stream_families_move_with_the_streams(backend: Backend, db: Conn) -> None:
    """Open streams up and down; events by kind (a burst larger than a page is a reset); a
    client whose queue overflows dropped as slow, the other dropped at shutdown."""
    settings = api_settings(
        backend.bootstrap,
        backend.database_url,
        api={
            "jwt_secret": JWT_SECRET,
            "audience": AUDIENCE,
            "pool_size": 4,
            "stream_queue_size": 1,
            "default_page_size": 1,
            "max_page_size": 1,  # one notification per look: two new at once is a reset
        },
    )
    moves = Moves(
        *[("herald_stream_events_total", {"event": e}) for e in ("notification", "unread", "reset")],
        *[("herald_stream_dropped_total", {"reason": r}) for r in ("slow", "shutdown")],
    )
    opened = value("herald_stream_clients")
    lagging, steady = f"st-{uuid.uuid4().hex[:8]}", f"st-{uuid.uuid4().hex[:8]}"
    with running_api(settings) as base:
        slow, kept = SseClient(base, lagging), SseClient(base, steady)
        try:
            for c in (slow, kept):
                assert c.next("unread").json() == {"count": 0}
            assert gauge("herald_stream_clients") - opened == 2
            announce(db, lagging, 1)
            assert [e.event for e in slow.take("unread")] == ["notification", "unread"]
            announce(db, lagging, 2)
            assert [e.event for e in slow.take("unread")] == ["notification", "reset", "unread"]
            # More wake-ups at once than its queue of one holds: that stream alone is dropped.
            with db.transaction(), db.cursor() as cur:
                for i in range(20):
                    stream.notify_users(cur, [lagging], kind=f"burst-{i}")  # distinct: none folded
            assert slow.ended.wait(5), "the slow stream was not dropped"
            wait_until(lambda: gauge("herald_stream_clients") - opened == 1, what="one stream left open")
            assert not kept.ended.is_set()
        finally:
            slow.close()
    # The server's shutdown ended the other one.
    assert kept.ended.wait(5)
    kept.close()
    assert gauge("herald_stream_clients") == opened
    assert moves.delta("herald_stream_dropped_total", reason="slow") == 1
    assert moves.delta("herald_stream_dropped_total", reason="shutdown") == 1
    assert moves.delta("herald_stream_events_total", event="notification") == 2
    assert moves.delta("herald_stream_events_total", event="reset") == 1
    # Two first looks and two after the announcements; the slow stream may have looked once
    # more before its drop ended it.
    assert 4 <= moves.delta("herald_stream_events_total", event="unread") <= 5


def announce(db: Conn, user: str, n: int) -> None:
    """``n`` new notifications for ``user`` in one transaction, announced as ingest does."""
    with db.transaction():
        add_notifications(db, user, n)
        with db.cursor() as cur:
            stream.notify_users(cur, [user])


# -- herald receiver's own ---------------------------------------------------------------------


def test_receiver_families_move_with_the_requests(settings: Settings) -> None:
    """One request of each outcome, by source; their durations; the producer's queue while an
    accepted record waits for the broker (a linger of a second holds it back)."""
    s = receiver_settings(settings, linger_ms=1000)
    sw, unknown = {"source": "sw"}, {"source": "unknown"}
    outcomes = ("accepted", "unauthorized", "too_large", "unsupported_media_type", "unavailable")
    moves = Moves(
        *[("herald_receiver_requests_total", {**sw, "outcome": o}) for o in outcomes],
        ("herald_receiver_requests_total", {**unknown, "outcome": "unknown_source"}),
        *[("herald_receiver_request_seconds_count", labels) for labels in (sw, unknown)],
        ("herald_receiver_request_seconds_sum", sw),
    )
    body = envelope("evt-families")
    # Within the receiver's 1 MiB, beyond what the producer sends (message.max.bytes, 1,000,000).
    huge = b'{"pad": "' + b"x" * 1_000_100 + b'"}'
    with running_receiver(s) as run:
        c = Client(run.url)
        try:
            assert c.post("/webhooks/nope", body, sign(s, "sw", body, "m-1")).status == 404
            assert c.request("POST", "/webhooks/sw", body, {"Content-Type": "text/plain"}).status == 415
            big = huge + b" " * 50_000
            assert c.post("/webhooks/sw", big, sign(s, "sw", big, "m-2")).status == 413
            assert c.post("/webhooks/sw", body, {}).status == 401
            assert c.post("/webhooks/sw", huge, sign(s, "sw", huge, "m-3")).status == 503
            assert gauge("herald_receiver_producer_queue") == 0
            replies: list[int] = []
            sender = threading.Thread(
                target=lambda: replies.append(c.post("/webhooks/sw", body, sign(s, "sw", body, "m-4")).status)
            )
            sender.start()
            wait_until(
                lambda: gauge("herald_receiver_producer_queue") == 1,
                what="the record waiting for its ack",
                timeout=5,
            )
            sender.join(10)
            assert replies == [202]
            assert gauge("herald_receiver_producer_queue") == 0
        finally:
            c.close()
    for o in outcomes:
        assert moves.delta("herald_receiver_requests_total", **sw, outcome=o) == 1, o
    assert moves.delta("herald_receiver_requests_total", **unknown, outcome="unknown_source") == 1
    assert moves.delta("herald_receiver_request_seconds_count", **sw) == len(outcomes)
    assert moves.delta("herald_receiver_request_seconds_count", **unknown) == 1
    assert moves.delta("herald_receiver_request_seconds_sum", **sw) >= 0.5, (
        "the accepted one waited for its ack"
    )


# -- herald lag-exporter's own -----------------------------------------------------------------


def test_lag_exporter_families_move_with_the_samples(settings: Settings) -> None:
    """Samples every 0.2 s: the lag of a group with records waiting, its status, the time of
    the last good sample and each sample's duration; then the broker out of reach: each
    failed sample counted, the last good one kept."""
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, [topics.events])
    produce_single(settings, topics.events, [b"{}"] * 3)
    group = new_group("fam-lag")
    set_offsets(settings, group, {(topics.events, 0): 1})
    cfg = settings.lag_exporter.model_copy(update={"groups": (group,), "interval_s": 0.2})
    s = settings.model_copy(update={"lag_exporter": cfg})
    lag = {"group": group, "topic": topics.events, "partition": "0"}
    moves = Moves(
        ("herald_lag_exporter_sample_seconds_count", {}),
        ("herald_lag_exporter_errors_total", {}),
    )
    started = time.time()
    stopper = Stopper()
    with (
        Kafka(s, 5.0) as kafka,
        Kafka(s.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"}), 0.5) as gone,
    ):
        exporter = LagExporter(s, kafka, [], metrics.lag_exporter(), Health())
        runner = threading.Thread(target=exporter.run, args=(stopper,), daemon=True)
        runner.start()
        try:
            wait_until(
                lambda: moves.so_far("herald_lag_exporter_sample_seconds_count") >= 2, what="two samples"
            )
            assert value("herald_consumer_lag_records", **lag) == 2
            assert 0 <= value("herald_consumer_lag_seconds", **lag) < time.time() - started + 1
            assert gauge("herald_consumer_group_status", group=group, status="stopped") == 1
            assert gauge("herald_consumer_group_status", group=group, status="ok") == 0
            last = gauge("herald_lag_exporter_last_success_timestamp_seconds")
            assert started - 1 <= last <= time.time()
            samples = moves.delta("herald_lag_exporter_sample_seconds_count")
            exporter.reader = LagReader(gone, s)  # the broker out of reach from here on
            wait_until(
                lambda: moves.so_far("herald_lag_exporter_errors_total") >= 2, what="two failed samples"
            )
        finally:
            stopper.set()
            runner.join(10)
    assert moves.delta("herald_lag_exporter_errors_total") >= 2
    assert moves.delta("herald_lag_exporter_sample_seconds_count") - samples <= 1, "failures are no samples"
    assert gauge("herald_lag_exporter_last_success_timestamp_seconds") - last < 1, "the last good one's time"
    assert value("herald_consumer_lag_records", **lag) == 2, "the last good sample is still served"


# -- the README documents every family ---------------------------------------------------------


def families() -> dict[str, str]:
    """Every family core/metrics.py defines, as /metrics names it, and its type: each group
    (a cached function of the module) asked for its collectors."""
    groups = [f for _, f in inspect.getmembers(metrics, callable) if hasattr(f, "cache_info")]
    assert {g.__name__ for g in groups} >= {
        "loop",
        "ingest",
        "deliver",
        "api",
        "stream",
        "receiver",
        "digest",
        "lag_exporter",
    }
    found: dict[str, str] = {}
    for group in groups:
        collectors: Any = group()
        for field in dataclasses.fields(collectors):
            for family in getattr(collectors, field.name).describe():
                found[family.name] = family.type
    return found


def test_the_readme_documents_every_family() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = []
    for name, kind in sorted(families().items()):
        # A counter is exported (and documented) with _total; a histogram by its name or a series of it.
        shown = {"counter": rf"{name}_total", "histogram": rf"{name}(_bucket|_count|_sum)?"}.get(kind, name)
        if not re.search(rf"\b{shown}\b", readme):
            missing.append(f"{name} ({kind})")
    assert not missing, f"README.md does not document: {', '.join(missing)}"
