"""Policy end to end: preferences, severities, routing, privacy, rate limits and fan-out.

One ingest run covers every scenario (each with its own users), then a second run by a
fresh consumer group replays the whole topic; the tests assert on snapshots of both.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg.rows import dict_row

from config.settings import CHANNELS, Settings
from core.policy import delivery_id
from herald.inspect import Record, read_topic
from herald.processes import IngestRun
from producers.publisher import KafkaPublisher, OutRecord, Position
from producers.topics import Topics, ensure_topics
from storage.db import Database
from storage.preferences import set_preferences
from tests.helpers import event, ingest, make_settings

if TYPE_CHECKING:
    from tests.conftest import Backend

pytestmark = pytest.mark.integration

MINUTE = "2030-01-01T10:00"
SECRET_BODY = "diagnosis: SECRET-BODY-7f3a"
SECRET_DATA = "SECRET-DATA-91c2"


@dataclass
class Snapshot:
    notifications: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    deliveries: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    rate_counts: dict[str, list[int]] = field(default_factory=dict)
    # topic -> records keyed to one of this module's users
    topics: dict[str, list[Record]] = field(default_factory=dict)

    def on(self, topic: str, user: str) -> list[dict[str, Any]]:
        return [json.loads(r.value or b"") for r in self.topics[topic] if r.key == user.encode()]

    def anywhere(self, user: str) -> list[Record]:
        return [r for recs in self.topics.values() for r in recs if r.key == user.encode()]


@dataclass
class World:
    settings: Settings
    topics: Topics
    users: dict[str, str]
    events: dict[str, list[dict[str, Any]]]
    first: Snapshot
    replay: Snapshot
    run1: IngestRun
    run2: IngestRun


def snapshot(settings: Settings, conn: psycopg.Connection[tuple[object, ...]], users: list[str]) -> Snapshot:
    snap = Snapshot()
    with conn.cursor(row_factory=dict_row) as cur:
        for u in users:
            cur.execute("SELECT * FROM notifications WHERE user_id = %s ORDER BY occurred_at, id", (u,))
            snap.notifications[u] = cur.fetchall()
            cur.execute("SELECT * FROM deliveries WHERE user_id = %s ORDER BY created_at, id", (u,))
            snap.deliveries[u] = cur.fetchall()
            cur.execute(
                "SELECT count FROM rate_limits WHERE user_id = %s ORDER BY window_start, channel", (u,)
            )
            snap.rate_counts[u] = [int(r["count"]) for r in cur.fetchall()]
    t = Topics(settings.topic_prefix)
    keys = {u.encode() for u in users}
    names = [*(t.deliveries(c) for c in CHANNELS), t.digests_pending]
    with ThreadPoolExecutor(len(names)) as pool:  # each read waits for end-of-partition: overlap them
        for topic, records in zip(names, pool.map(lambda n: read_topic(settings, n), names), strict=True):
            snap.topics[topic] = [r for r in records if r.key in keys]
    return snap


def produce_keyed(settings: Settings, records: list[tuple[str, dict[str, Any]]]) -> list[Position]:
    """Like helpers.produce, with a key per record and one producer for all of them."""
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.ingest_topics())
    pub = KafkaPublisher(settings)
    try:
        return pub.publish(
            [OutRecord(topic=topics.events, key=k.encode(), value=json.dumps(v).encode()) for k, v in records]
        )
    finally:
        pub.close()


@pytest.fixture(scope="module")
def world(backend: Backend) -> Iterator[World]:
    settings = make_settings(backend.bootstrap, backend.database_url)
    tag = uuid.uuid4().hex[:6]
    users = {
        name: f"{name}-{tag}"
        for name in ("off", "hidden", "quiet", "route", "rate", "fan_a", "fan_b", "fan_c")
    }
    u = users
    db = Database(backend.database_url)
    try:
        set_preferences(db, u["off"], {"email": False, "push": False, "webhook": False})
        set_preferences(db, u["hidden"], {"in_app": False, "email": True})
        set_preferences(db, u["quiet"], {"email": True, "push": True, "webhook": True})
        set_preferences(db, u["route"], {"email": True})
        set_preferences(db, u["rate"], {"email": True})
        set_preferences(db, u["fan_b"], {"email": True})
    finally:
        db.close()

    events: dict[str, list[dict[str, Any]]] = {
        "off": [event(user_id=u["off"], severity="critical"), event(user_id=u["off"], severity="warning")],
        "hidden": [event(user_id=u["hidden"], severity="critical", title="Hidden critical")],
        "quiet": [event(user_id=u["quiet"], severity="info"), event(user_id=u["quiet"], severity="success")],
        "route": [
            event(
                user_id=u["route"],
                severity="critical",
                title="Card declined",
                body=SECRET_BODY,
                sensitive=True,
                data={"card": SECRET_DATA},
                target_url="/billing",
                occurred_at=f"{MINUTE}:00Z",
            ),
            event(
                user_id=u["route"],
                severity="warning",
                title="Job slow",
                body="Report mailed to alice@example.com",
                data={"k": SECRET_DATA},
                batch_key="jobs",
                occurred_at=f"{MINUTE}:01Z",
            ),
        ],
        "rate": [
            event(
                user_id=u["rate"],
                severity="critical",
                title=f"Critical {i}",
                occurred_at=f"{MINUTE}:{i:02d}Z",
            )
            for i in range(6)
        ],
        "fan": [
            event(
                user_id=None,
                recipients=[u["fan_a"], u["fan_b"], u["fan_c"], u["fan_b"]],
                severity="critical",
                title="Team alert",
                resource_id="incident-1",
            )
        ],
    }
    # One key per scenario: its events stay in order on one partition.
    positions = produce_keyed(settings, [(name, e) for name, evs in events.items() for e in evs])

    all_users = list(u.values())
    with psycopg.connect(backend.database_url, autocommit=True) as conn:
        run1 = ingest(settings, positions)
        first = snapshot(settings, conn, all_users)
        run2 = ingest(settings, positions)  # a fresh group: replays the topic from offset zero
        replay = snapshot(settings, conn, all_users)
    yield World(settings, Topics(settings.topic_prefix), users, events, first, replay, run1, run2)


def email_topic(w: World) -> str:
    return w.topics.deliveries("email")


def test_channel_off_keeps_the_in_app_row_and_queues_nothing(world: World) -> None:
    u = world.users["off"]
    rows = world.first.notifications[u]
    assert sorted(r["severity"] for r in rows) == ["critical", "warning"]
    assert not any(r["hidden"] for r in rows)
    assert world.first.deliveries[u] == []
    assert world.first.rate_counts[u] == []
    assert world.first.anywhere(u) == []
    assert world.replay.anywhere(u) == []


def test_in_app_off_stores_a_hidden_row_and_still_sends_external(world: World) -> None:
    u = world.users["hidden"]
    [row] = world.first.notifications[u]
    assert row["hidden"] is True
    assert row["title"] == "Hidden critical"
    [d] = world.first.deliveries[u]
    assert (d["channel"], d["route"], d["id"]) == ("email", "immediate", delivery_id(row["id"], "email"))
    assert [r["notification_id"] for r in world.first.on(email_topic(world), u)] == [str(row["id"])]


def test_replay_from_a_fresh_group_sends_nothing_again(world: World) -> None:
    assert world.run2.handler.totals.inserted == 0
    assert world.run2.handler.totals.republished == 0
    for topic, records in world.first.topics.items():
        assert len(world.replay.topics[topic]) == len(records), topic
    assert world.replay.notifications == world.first.notifications
    assert world.replay.deliveries == world.first.deliveries
    assert world.replay.rate_counts == world.first.rate_counts
    # the hidden row stays hidden, and its email was not re-sent
    u = world.users["hidden"]
    assert [r["hidden"] for r in world.replay.notifications[u]] == [True]
    assert len(world.replay.on(email_topic(world), u)) == 1


def test_info_and_success_create_no_external_delivery(world: World) -> None:
    u = world.users["quiet"]
    assert sorted(r["severity"] for r in world.first.notifications[u]) == ["info", "success"]
    assert world.first.deliveries[u] == []
    assert world.first.anywhere(u) == []


def test_critical_goes_to_the_channel_topic_and_warning_to_the_digest(world: World) -> None:
    u = world.users["route"]
    by_sev = {r["severity"]: r for r in world.first.notifications[u]}
    [crit] = world.first.on(email_topic(world), u)
    [warn] = world.first.on(world.topics.digests_pending, u)
    assert crit["notification_id"] == str(by_sev["critical"]["id"])
    assert (crit["route"], crit["reason"], crit["channel"], crit["severity"]) == (
        "immediate",
        None,
        "email",
        "critical",
    )
    assert crit["title"] == "Card declined"
    assert crit["target_url"] == "/billing"
    assert crit["summary"] is None  # sensitive: no default summary from the body
    assert warn["notification_id"] == str(by_sev["warning"]["id"])
    assert (warn["route"], warn["reason"], warn["channel"], warn["batch_key"]) == (
        "digest",
        "warning",
        "email",
        "jobs",
    )
    assert warn["summary"] == "Report mailed to [redacted]"
    stored = {(d["route"], d["reason"]) for d in world.first.deliveries[u]}
    assert stored == {("immediate", None), ("digest", "warning")}


def test_external_records_are_privacy_safe(world: World) -> None:
    records = [r for recs in world.first.topics.values() for r in recs]
    assert records
    for rec in records:
        value = rec.value or b""
        payload = json.loads(value)
        assert "body" not in payload and "data" not in payload
        assert SECRET_BODY.encode() not in value and SECRET_DATA.encode() not in value
        assert b"alice@example.com" not in value
        assert rec.headers["herald-delivery-id"].decode() == payload["delivery_id"]
    # and the full body and data did stay in PostgreSQL
    [crit] = [r for r in world.first.notifications[world.users["route"]] if r["severity"] == "critical"]
    assert crit["body"] == SECRET_BODY
    assert crit["data"] == {"card": SECRET_DATA}


def test_sixth_critical_email_in_a_minute_is_folded_into_the_digest(world: World) -> None:
    u = world.users["rate"]
    rows = world.first.notifications[u]
    assert len(rows) == 6  # rate limits never drop the in-app record
    sent = world.first.on(email_topic(world), u)
    folded = world.first.on(world.topics.digests_pending, u)
    assert len(sent) == 5
    assert [(f["route"], f["reason"]) for f in folded] == [("digest", "rate_limited")]
    sixth = next(r for r in rows if r["title"] == "Critical 5")
    assert folded[0]["notification_id"] == str(sixth["id"])
    assert sorted((d["route"], d["reason"] or "") for d in world.first.deliveries[u]) == (
        [("digest", "rate_limited")] + [("immediate", "")] * 5
    )
    assert world.first.rate_counts[u] == [6]


def test_recipients_fan_out_one_notification_each(world: World) -> None:
    ids = set()
    for name in ("fan_a", "fan_b", "fan_c"):
        u = world.users[name]
        [row] = world.first.notifications[u]
        assert row["title"] == "Team alert"
        assert row["idempotency_key"] == "r:22:invoice.payment_failed:incident-1"
        ids.add(row["id"])
    assert len(ids) == 3
    # only fan_b turned email on: one delivery, for fan_b alone
    assert world.first.deliveries[world.users["fan_a"]] == []
    assert len(world.first.deliveries[world.users["fan_b"]]) == 1
    assert len(world.first.on(email_topic(world), world.users["fan_b"])) == 1


def test_every_delivery_row_is_published(world: World) -> None:
    rows = [d for ds in world.first.deliveries.values() for d in ds]
    assert len(rows) == 1 + 2 + 6 + 1  # hidden, route, rate, fan_b
    assert all(d["published_at"] is not None for d in rows)
    records = [r for recs in world.first.topics.values() for r in recs]
    on_topics = {json.loads(r.value or b"")["delivery_id"] for r in records}
    assert on_topics == {str(d["id"]) for d in rows}
