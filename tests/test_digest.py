"""Digests end to end: warnings in through ingest, one digest per event-time window out.

Real parts only: the session's broker and PostgreSQL, the real ingest and digest
processes (in-process threads), and, where the body matters, the real deliverer posting
to a loopback webhook peer that checks signatures. Windows are 2 s long and close 3 s
after their end (``HERALD_POLICY__DIGEST_SECONDS``, ``HERALD_DIGEST__GRACE_S``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from config.settings import Settings
from consumers.digest import Batch, DigestHandler, Pending
from core.digest import close_delay
from core.errors import BrokerUnavailable
from core.policy import align_window
from herald.inspect import read_topic, wait_committed, wait_group_stable
from herald.processes import DigestRun, run_digest
from producers.publisher import KafkaPublisher, OutRecord, Position
from producers.topics import Topics, ensure_topics
from storage.db import Database
from storage.preferences import add_endpoint
from tests.conftest import Backend
from tests.helpers import IngestThread, RunThread, event, make_settings, produce, start_ingest, start_thread
from tests.test_deliver import SECRET, start_deliver
from tests.webhook_peer import start_peer

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]
WINDOW_S = 2
GRACE_S = 3.0


def digest_settings(backend: Backend, **digest: Any) -> Settings:
    return make_settings(
        backend.bootstrap,
        backend.database_url,
        policy={"webhook": True, "digest_seconds": WINDOW_S},
        digest={"grace_s": GRACE_S, "tick_s": 0.2, "titles": 5, **digest},
        delivery={"retry_tiers": ["1s"], "max_attempts": 2, "lease_s": 10},
        webhook={"timeout_s": 2.0, "allow_private_targets": True},
        app_url="https://app.example.com/",
        outbox_relay_after_s=1.0,
        outbox_relay_every_s=0.5,
    )


def start_digest(settings: Settings, group: str | None = None) -> RunThread[DigestRun]:
    return start_thread(
        "digest",
        group or f"dg-{uuid.uuid4().hex[:8]}",
        lambda g, st: run_digest(settings, group=g, stopper=st),
    )


@dataclass
class Pipeline:
    settings: Settings
    ingest: IngestThread
    digest: RunThread[DigestRun]


@pytest.fixture
def pipeline_for(db: Conn, backend: Backend) -> Iterator[Callable[..., Pipeline]]:
    """Ingest and digest running and joined, before anything is produced."""
    started: list[Pipeline] = []

    def start(**digest: Any) -> Pipeline:
        s = digest_settings(backend, **digest)
        ing = start_ingest(s)
        dig = start_digest(s)
        wait_group_stable(s, ing.group, 30)
        wait_group_stable(s, dig.group, 30)
        p = Pipeline(s, ing, dig)
        started.append(p)
        return p

    yield start
    for p in started:
        p.ingest.stop()
        if p.digest.thread.is_alive():
            p.digest.stop()


def add_webhook(settings: Settings, user: str, url: str) -> None:
    d = Database.from_settings(settings)
    try:
        add_endpoint(d, user, "webhook", url, SECRET)
    finally:
        d.close()


def current_window(seconds: int = WINDOW_S) -> datetime:
    """The start of the window now falls in: its end (+ grace) is at most ``seconds`` away."""
    return align_window(datetime.now(UTC), seconds)


def warnings(user: str, n: int, at: datetime, **fields: Any) -> list[dict[str, Any]]:
    """``n`` warnings, in order, within a few ms of ``at`` (one event-time window)."""
    return [
        event(
            user_id=user,
            severity="warning",
            title=f"Job {user} failed #{i:03d}",
            target_url=f"/jobs/{user}/{i}",
            occurred_at=(at + timedelta(milliseconds=i)).isoformat(),
            **fields,
        )
        for i in range(n)
    ]


def wait_until(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout}s")


def windows(db: Conn) -> list[dict[str, Any]]:
    cur = db.execute(
        "SELECT id, user_id, batch_key, window_start, sequence, status, item_count, closes_at, closed_at,"
        " settled_at,"
        " window_start + make_interval(secs => window_seconds) AS window_end"
        " FROM digest_windows ORDER BY user_id, batch_key, window_start, sequence"
    )
    cols = [c.name for c in cur.description or []]
    return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]


def all_closed(db: Conn, expected: int) -> Callable[[], bool]:
    def check() -> bool:
        ws = windows(db)
        return len(ws) == expected and all(w["status"] != "open" and w["settled_at"] for w in ws)

    return check


def digests_on_topic(settings: Settings, channel: str = "webhook") -> list[dict[str, Any]]:
    recs = read_topic(settings, Topics(settings.topic_prefix).deliveries(channel))
    return [json.loads(r.value or b"") for r in recs if json.loads(r.value or b"").get("type") == "digest"]


def item_statuses(db: Conn, user: str) -> dict[str, int]:
    rows = db.execute(
        "SELECT status, count(*) FROM deliveries WHERE user_id = %s AND notification_id IS NOT NULL"
        " GROUP BY status",
        (user,),
    ).fetchall()
    return {str(s): int(str(n)) for s, n in rows}


def test_a_storm_of_80_warnings_is_one_digest(db: Conn, pipeline_for: Callable[..., Pipeline]) -> None:
    p = pipeline_for()
    peer = start_peer(SECRET)
    add_webhook(p.settings, "storm", peer.url("/ok"))
    deliverer = start_deliver(p.settings)
    try:
        start = current_window()
        produce(p.settings, warnings("storm", 80, start))
        wait_until(all_closed(db, 1), timeout=30, what="the storm's window closed")
        wait_until(lambda: len(peer.at("/ok")) >= 1, timeout=15, what="the digest posted")
        time.sleep(0.5)  # nothing else comes
    finally:
        deliverer.stop()
        peer.close()
    (w,) = windows(db)
    assert (w["status"], w["item_count"], w["sequence"], w["batch_key"]) == ("sent", 80, 0, "")
    assert w["closed_at"] >= w["window_end"] + timedelta(seconds=GRACE_S), "closed before end + grace"
    (d,) = digests_on_topic(p.settings)
    assert d["delivery_id"] == str(w["id"]) and d["user_id"] == "storm"
    assert d["count"] == 80 and d["more"] == 75
    assert d["summary"].endswith("and 75 more") and d["title"] == "80 new notifications"
    assert "body" not in d and "data" not in d
    (got,) = peer.at("/ok")
    assert got.verified and got.headers["webhook-id"] == str(w["id"])
    assert got.json == {
        "type": "digest",
        "id": str(w["id"]),
        "user_id": "storm",
        "batch_key": None,
        "count": 80,
        "items": [
            {
                "notification_id": i["notification_id"],
                "title": f"Job storm failed #{n:03d}",
                "url": f"https://app.example.com/jobs/storm/{n}",
            }
            for n, i in enumerate(d["items"])
        ],
        "window_start": start.isoformat(),
        "window_end": (start + timedelta(seconds=WINDOW_S)).isoformat(),
    }
    assert len(got.json["items"]) == 5
    assert item_statuses(db, "storm") == {"digested": 80}
    row = db.execute("SELECT route, status FROM deliveries WHERE id = %s", (w["id"],)).fetchone()
    assert row == ("digest", "sent")


def test_users_and_batch_keys_stay_apart(db: Conn, pipeline_for: Callable[..., Pipeline]) -> None:
    p = pipeline_for()
    start = current_window()
    evs = warnings("ann", 3, start, batch_key="build") + warnings("ann", 2, start, batch_key="deploy")
    evs += warnings("bob", 4, start, batch_key="build") + warnings("bob", 1, start)
    # Same titles for ann's two keys would be deduplicated by nothing: ids differ per event.
    produce(p.settings, evs)
    wait_until(all_closed(db, 4), timeout=30, what="four windows closed")
    got = {(w["user_id"], w["batch_key"]): w["item_count"] for w in windows(db)}
    assert got == {("ann", "build"): 3, ("ann", "deploy"): 2, ("bob", "build"): 4, ("bob", ""): 1}
    wait_until(lambda: len(digests_on_topic(p.settings)) == 4, timeout=10, what="four digests")
    # The window is fixed at ingest, on every item's delivery row.
    fixed = db.execute(
        "SELECT DISTINCT window_start, window_seconds FROM deliveries WHERE notification_id IS NOT NULL"
    ).fetchall()
    assert fixed == [(start, WINDOW_S)]
    counts = {(d["user_id"], d["batch_key"]): d["count"] for d in digests_on_topic(p.settings)}
    assert counts == {("ann", "build"): 3, ("ann", "deploy"): 2, ("bob", "build"): 4, ("bob", None): 1}


def test_a_quiet_user_still_gets_the_digest_after_window_plus_grace(
    db: Conn, pipeline_for: Callable[..., Pipeline]
) -> None:
    p = pipeline_for()
    produce(p.settings, warnings("quiet", 1, current_window()))
    wait_until(lambda: len(windows(db)) == 1, timeout=15, what="the window opened")
    (w,) = windows(db)
    due = w["window_end"] + timedelta(seconds=GRACE_S)
    assert w["status"] == "open"
    wait_until(all_closed(db, 1), timeout=20, what="the quiet window closed by time alone")
    (w,) = windows(db)
    # Not before end + grace; soon after (the tick, unless the loop's lag report held it).
    assert w["status"] == "sent" and due <= w["closed_at"] < due + timedelta(seconds=5)
    wait_until(lambda: len(digests_on_topic(p.settings)) == 1, timeout=10, what="the digest")


def test_the_spread_closes_each_users_window_at_its_own_share(
    db: Conn, pipeline_for: Callable[..., Pipeline]
) -> None:
    grace, spread = 0.5, 4.0
    p = pipeline_for(grace_s=grace, spread_s=spread)
    users = [f"spread-{i}" for i in range(8)]
    start = current_window()
    produce(p.settings, [e for u in users for e in warnings(u, 1, start)])
    wait_until(all_closed(db, len(users)), timeout=30, what="every user's window closed")
    ws = {w["user_id"]: w for w in windows(db)}
    for u in users:
        due = ws[u]["window_end"] + timedelta(seconds=close_delay(u, grace, spread))
        assert abs(ws[u]["closes_at"] - due) < timedelta(milliseconds=1), u
        assert ws[u]["status"] == "sent" and ws[u]["closed_at"] >= due, f"{u} closed before its share"
    dues = sorted(close_delay(u, grace, spread) for u in users)
    assert dues[-1] - dues[0] > 1.0, "these users' shares are apart"
    # The windows left in the order of their shares, not all in one tick.
    by_close = sorted(users, key=lambda u: ws[u]["closed_at"])
    by_share = sorted(users, key=lambda u: close_delay(u, grace, spread))
    assert [close_delay(u, grace, spread) for u in by_close] == pytest.approx(
        [close_delay(u, grace, spread) for u in by_share], abs=0.3
    )
    wait_until(lambda: len(digests_on_topic(p.settings)) == len(users), timeout=10, what="one digest each")


def test_read_items_are_left_out_and_an_all_read_window_sends_nothing(
    db: Conn, pipeline_for: Callable[..., Pipeline]
) -> None:
    p = pipeline_for(grace_s=4.0)
    start = current_window()
    produce(p.settings, warnings("reader", 3, start) + warnings("done", 2, start))
    wait_until(lambda: db.execute("SELECT count(*) FROM digest_items").fetchone() == (5,), what="items in")
    # The user reads in the app before the window closes: one of reader's, both of done's.
    db.execute(
        "UPDATE notifications SET read_at = now() WHERE (user_id = 'reader' AND title LIKE '%%#001')"
        " OR user_id = 'done'"
    )
    wait_until(all_closed(db, 2), timeout=30, what="both windows closed")
    status = {w["user_id"]: w["status"] for w in windows(db)}
    assert status == {"reader": "sent", "done": "suppressed"}
    wait_until(lambda: len(digests_on_topic(p.settings)) == 1, timeout=10, what="reader's digest")
    (d,) = digests_on_topic(p.settings)
    assert d["user_id"] == "reader" and d["count"] == 2
    assert [i["title"] for i in d["items"]] == ["Job reader failed #000", "Job reader failed #002"]
    assert item_statuses(db, "reader") == {"digested": 2, "suppressed": 1}
    assert item_statuses(db, "done") == {"suppressed": 2}
    assert [d["user_id"] for d in digests_on_topic(p.settings)] == ["reader"], "none for done, ever"


def test_max_items_closes_early_and_the_rest_go_to_the_next_sequence(
    db: Conn, pipeline_for: Callable[..., Pipeline]
) -> None:
    p = pipeline_for(max_items=5, grace_s=30.0)
    produce(p.settings, warnings("busy", 12, current_window()))
    wait_until(
        lambda: [w["status"] for w in windows(db)] == ["sent", "sent", "open"],
        timeout=20,
        what="two full windows closed early, the third open",
    )
    ws = windows(db)
    assert [(w["sequence"], w["item_count"]) for w in ws] == [(0, 5), (1, 5), (2, 2)]
    assert all(w["closed_at"] < w["window_end"] + timedelta(seconds=30) for w in ws[:2]), "closed early"
    assert len({w["id"] for w in ws}) == 3
    wait_until(lambda: len(digests_on_topic(p.settings)) == 2, timeout=10, what="two digests")
    got = sorted((d["sequence"], d["count"]) for d in digests_on_topic(p.settings))
    assert got == [(0, 5), (1, 5)]
    per_window = db.execute("SELECT count(DISTINCT delivery_id), count(*) FROM digest_items").fetchone()
    assert per_window == (12, 12), "each item in exactly one window"


def test_replay_from_the_start_sends_no_new_digest(db: Conn, pipeline_for: Callable[..., Pipeline]) -> None:
    p = pipeline_for()
    start = current_window()
    produce(p.settings, warnings("replayed", 6, start) + warnings("other", 2, start, batch_key="k"))
    wait_until(all_closed(db, 2), timeout=30, what="both windows closed")
    wait_until(lambda: len(digests_on_topic(p.settings)) == 2, timeout=10, what="two digests")
    before = windows(db)
    p.digest.stop()
    # A new group reads herald.digests.pending from the start: every item again.
    again = start_digest(p.settings)
    try:
        wait_group_stable(p.settings, again.group, 30)
        wait_committed(p.settings, again.group, _last_offsets(p.settings), timeout=20)
        time.sleep(1.0)  # ticks after the replay
    finally:
        run = again.stop()
    assert run.handler.totals.duplicates == 8 and run.handler.totals.added == 0
    assert windows(db) == before
    assert len(digests_on_topic(p.settings)) == 2


def _last_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    last: dict[tuple[str, int], int] = {}
    for r in read_topic(settings, Topics(settings.topic_prefix).digests_pending):
        last[(r.topic, r.partition)] = max(r.offset, last.get((r.topic, r.partition), -1))
    return last


def test_two_digest_processes_in_one_group_split_the_work(
    db: Conn, pipeline_for: Callable[..., Pipeline]
) -> None:
    p = pipeline_for()
    second = start_digest(p.settings, group=p.digest.group)
    try:
        wait_group_stable(p.settings, p.digest.group, 30)
        time.sleep(p.settings.session_timeout_ms / 1000)  # the rebalance that gives it partitions
        start = current_window()
        users = [f"split-{i}" for i in range(6)]
        produce(p.settings, [e for u in users for e in warnings(u, 10, start)])
        wait_until(all_closed(db, 6), timeout=30, what="six windows closed")
        wait_until(lambda: len(digests_on_topic(p.settings)) >= 6, timeout=10, what="six digests")
    finally:
        other = second.stop()
    first = p.digest.stop()
    assert {(w["user_id"], w["item_count"], w["sequence"]) for w in windows(db)} == {
        (u, 10, 0) for u in users
    }
    assert sorted(d["user_id"] for d in digests_on_topic(p.settings)) == users
    assert first.handler.totals.added + other.handler.totals.added == 60
    assert first.handler.totals.sent + other.handler.totals.sent == 6


class _BrokerAway:
    """A publisher whose broker never acknowledges: the crash between commit and publish."""

    def publish(self, records: Sequence[OutRecord]) -> list[Position]:
        raise BrokerUnavailable("no ack (test)")

    def close(self) -> None:
        return None


def test_a_digest_committed_but_never_acknowledged_is_published_again_unchanged(
    db: Conn, backend: Backend
) -> None:
    s = digest_settings(backend, grace_s=0.0)
    s = s.model_copy(update={"outbox_relay_after_s": 0.1})
    topics = Topics(s.topic_prefix)
    ensure_topics(s, [topics.digests_pending, topics.deliveries("webhook")])
    start = current_window() - timedelta(seconds=60)  # long past: due at once
    items = [
        Pending(
            uuid.uuid4(),
            uuid.uuid4(),
            "lost",
            "webhook",
            "",
            start,
            WINDOW_S,
            "warning",
            f"t{i}",
            None,
            start,
        )
        for i in range(3)
    ]
    for i in items:
        db.execute(
            "INSERT INTO notifications (id, user_id, source, type, severity, title, idempotency_key,"
            " occurred_at) VALUES (%s, 'lost', 'test', 'job.failed', 'warning', %s, %s, %s)",
            (i.notification_id, i.title, f"k:{i.delivery_id}", start),
        )
    d1, d2 = Database.from_settings(s), Database.from_settings(s)
    try:
        crashed = DigestHandler(s, d1, d2, _BrokerAway(), topics)
        crashed.apply(Batch(items))
        with pytest.raises(BrokerUnavailable):
            crashed.close_due()
        (w,) = windows(db)
        assert w["status"] == "sent" and w["settled_at"] is None
        row = db.execute("SELECT published_at FROM deliveries WHERE id = %s", (w["id"],)).fetchone()
        assert row == (None,)
        stored = db.execute("SELECT digest FROM digest_windows WHERE id = %s", (w["id"],)).fetchone()
        time.sleep(0.2)
        publisher = KafkaPublisher(s)
        try:
            again = DigestHandler(s, d1, d2, publisher, topics)
            assert again.close_due() == 0, "a sent window is never closed twice"
            assert again.relay() == 1
        finally:
            publisher.close()
    finally:
        d1.close()
        d2.close()
    (d,) = digests_on_topic(s)
    assert stored is not None and d == stored[0] and d["count"] == 3
    (w,) = windows(db)
    assert w["settled_at"] is not None
    row = db.execute("SELECT published_at IS NOT NULL FROM deliveries WHERE id = %s", (w["id"],)).fetchone()
    assert row == (True,)
