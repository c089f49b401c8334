"""Pure digest rules: windows, ids, assignment to windows and follow-ups, the record, the body."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

from channels.webhook import webhook_body
from config.settings import PolicySettings
from consumers.digest import Pending, assign
from core.digest import DigestItem, close_delay, digest_id, digest_record
from core.envelope import Notification
from core.policy import DIGEST, Preferences, align_window, decision_record, plan
from storage.digests import Latest

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def pending(
    n: int, *, user: str = "u", key: str = "", start: datetime = T0, secs: int = 300
) -> list[Pending]:
    return [
        Pending(
            delivery_id=uuid.uuid5(uuid.NAMESPACE_OID, f"{user}{key}{i}"),
            notification_id=uuid.uuid4(),
            user_id=user,
            channel="webhook",
            batch_key=key,
            window_start=start,
            window_seconds=secs,
            severity="warning",
            title=f"t{i}",
            target_url=None,
            occurred_at=start + timedelta(seconds=i),
        )
        for i in range(n)
    ]


def test_windows_are_aligned_to_multiples_of_their_length_since_the_epoch() -> None:
    at = datetime(2026, 1, 1, 12, 7, 31, 500_000, tzinfo=UTC)
    assert align_window(at, 300) == datetime(2026, 1, 1, 12, 5, tzinfo=UTC)
    assert align_window(at, 10) == datetime(2026, 1, 1, 12, 7, 30, tzinfo=UTC)
    other_zone = at.astimezone(datetime.now().astimezone().tzinfo)
    assert align_window(other_zone, 300) == align_window(at, 300)


def test_the_spread_gives_each_user_a_fixed_share_after_the_grace() -> None:
    assert close_delay("ann", 30.0, 0.0) == 30.0, "no spread: every window closes at end + grace"
    users = [f"user-{i}" for i in range(2000)]
    delays = [close_delay(u, 30.0, 60.0) for u in users]
    assert all(30.0 <= d < 90.0 for d in delays)
    assert delays == [close_delay(u, 30.0, 60.0) for u in users], "the same share every time"
    # Spread evenly: every tenth of the spread gets about a tenth of the users.
    tenths = [0] * 10
    for d in delays:
        tenths[int((d - 30.0) / 6.0)] += 1
    assert all(140 <= n <= 260 for n in tenths), tenths
    # A share, not a per-window draw: a user's channels and batch keys close together.
    assert close_delay("ann", 2.0, 5.0) - 2.0 == (close_delay("ann", 30.0, 60.0) - 30.0) / 12


def test_the_digest_id_is_deterministic_and_names_the_whole_key() -> None:
    base = digest_id("u", "webhook", "", T0, 0)
    assert base == digest_id("u", "webhook", "", T0.astimezone(), 0)
    others = {
        digest_id("u", "webhook", "", T0, 1),
        digest_id("u", "webhook", "k", T0, 0),
        digest_id("u", "email", "", T0, 0),
        digest_id("v", "webhook", "", T0, 0),
        digest_id("u", "webhook", "", T0 + timedelta(seconds=300), 0),
    }
    assert base not in others and len(others) == 5


def test_items_fill_the_open_window_then_follow_ups_by_sequence() -> None:
    items = list(reversed(pending(12)))  # arrival order does not decide: event time does
    adds, rows = assign(items, {}, max_items=5)
    assert [(a.sequence, a.count, a.full) for a in adds] == [(0, 5, True), (1, 5, True), (2, 2, False)]
    first = [r.delivery_id for r in rows if r.window_id == adds[0].id]
    assert first == [p.delivery_id for p in pending(12)[:5]]
    assert adds[0].id == digest_id("u", "webhook", "", T0, 0)


def test_an_open_window_is_topped_up_and_a_sent_one_gets_a_follow_up() -> None:
    wid = digest_id("u", "webhook", "", T0, 0)
    adds, _ = assign(pending(3), {("u", "webhook", "", T0): Latest(wid, 0, "open", 3)}, max_items=5)
    assert [(a.id, a.sequence, a.count, a.full) for a in adds] == [
        (wid, 0, 2, True),
        (adds[1].id, 1, 1, False),
    ]
    adds, _ = assign(pending(2), {("u", "webhook", "", T0): Latest(wid, 0, "sent", 3)}, max_items=5)
    assert [(a.sequence, a.count) for a in adds] == [(1, 2)]
    assert adds[0].id == digest_id("u", "webhook", "", T0, 1)


def test_users_batch_keys_and_window_starts_never_share_a_window() -> None:
    items = pending(2, user="a") + pending(2, user="b") + pending(2, user="a", key="k")
    items += pending(1, user="a", start=T0 + timedelta(seconds=300))
    adds, rows = assign(items, {}, max_items=100)
    assert sorted((a.key[0], a.key[2], a.count) for a in adds) == [
        ("a", "", 1),
        ("a", "", 2),
        ("a", "k", 2),
        ("b", "", 2),
    ]
    assert len(rows) == 7


def test_the_digest_record_counts_lists_the_first_items_and_redacts() -> None:
    policy = PolicySettings()
    first = [DigestItem(uuid.uuid4(), f"Job {i} failed", f"/jobs/{i}") for i in range(3)]
    rec = digest_record(
        delivery_id=uuid.uuid4(),
        user_id="u",
        channel="webhook",
        batch_key="owner alice@example.com",
        window_start=T0,
        window_seconds=300,
        sequence=1,
        count=80,
        first=first,
        critical=False,
        inbox_path="/notifications",
        policy=policy,
    )
    assert rec["count"] == 80 and rec["more"] == 77 and rec["sequence"] == 1
    assert rec["summary"] == "Job 0 failed; Job 1 failed; Job 2 failed and 77 more"
    assert "alice@example.com" not in rec["batch_key"] and "alice@example.com" not in rec["title"]
    assert rec["window_end"] == (T0 + timedelta(seconds=300)).isoformat()
    assert rec["target_url"] == "/notifications" and rec["severity"] == "warning"
    assert rec["type"] == "digest" and rec["route"] == DIGEST and rec["notification_id"] is None
    body = webhook_body(rec, "https://app.example.com")
    assert set(body) == {"type", "id", "user_id", "batch_key", "count", "items", "window_start", "window_end"}
    assert body["items"][2] == {
        "notification_id": str(first[2].notification_id),
        "title": "Job 2 failed",
        "url": "https://app.example.com/jobs/2",
    }


def test_a_single_delivery_keeps_its_body() -> None:
    rec = {
        "delivery_id": "d",
        "notification_id": "n",
        "user_id": "u",
        "severity": "critical",
        "title": "t",
        "occurred_at": T0.isoformat(),
        "type": "invoice.failed",
    }
    assert webhook_body(rec, None)["type"] == "notification"


def test_the_window_is_fixed_at_ingest_on_the_digest_entry() -> None:
    n = Notification(
        id=uuid.uuid4(),
        user_id="u",
        source="s",
        type="job.failed",
        category=None,
        severity="warning",
        title="t",
        body=None,
        summary=None,
        target_url=None,
        data=None,
        sensitive=False,
        idempotency_key="k:1",
        batch_key=None,
        occurred_at=datetime(2026, 1, 1, 12, 7, 31, tzinfo=UTC),
    )
    policy = PolicySettings(webhook=True)
    prefs = Preferences.defaults(policy).merged({"digest_minutes": 10})
    (d,) = plan(n, prefs)
    rec = decision_record(d, policy)
    assert (rec["window_start"], rec["window_seconds"]) == ("2026-01-01T12:00:00+00:00", 600)
    quick = Preferences.defaults(PolicySettings(webhook=True, digest_seconds=2))
    assert quick.merged({"digest_minutes": 10}).window_seconds == 2
    assert Preferences.defaults(PolicySettings(digest_minutes=0)).window_seconds == 300


def test_a_republished_digest_entry_keeps_the_window_of_its_row() -> None:
    """The outbox publishes rows again from PostgreSQL: the window comes from the row, not from
    preferences read again (a user who changed digest_minutes meanwhile forms no other window)."""
    from config.settings import Settings
    from consumers.outbox import stored_record
    from producers.topics import Topics
    from storage.notifications import UnpublishedDelivery

    row = UnpublishedDelivery(
        id=uuid.uuid4(),
        notification_id=uuid.uuid4(),
        user_id="u",
        channel="webhook",
        route=DIGEST,
        reason="warning",
        severity="warning",
        type="job.failed",
        category=None,
        title="t",
        summary=None,
        target_url=None,
        batch_key=None,
        occurred_at=T0 + timedelta(seconds=42),
        window_start=T0,
        window_seconds=600,
    )
    rec = stored_record(row, Topics("p"), Settings(policy={"digest_seconds": 5}))
    assert rec.topic == "p.digests.pending"
    payload = json.loads(rec.value or b"")
    assert (payload["window_start"], payload["window_seconds"]) == (T0.isoformat(), 600)


class _Msg:
    def __init__(self, value: bytes) -> None:
        self._value = value

    def value(self) -> bytes:
        return self._value


def test_an_entry_without_a_window_gets_the_aligned_default_and_junk_is_refused() -> None:
    from consumers.digest import parse

    entry = {
        "delivery_id": str(uuid.uuid4()),
        "notification_id": str(uuid.uuid4()),
        "user_id": "u",
        "channel": "email",
        "severity": "warning",
        "title": "t",
        "batch_key": None,
        "occurred_at": "2026-01-01T12:07:31+00:00",
    }
    p = parse(_Msg(json.dumps(entry).encode()), 300)
    assert (p.window_start, p.window_seconds, p.batch_key) == (
        datetime(2026, 1, 1, 12, 5, tzinfo=UTC),
        300,
        "",
    )
    fixed = {**entry, "window_start": "2026-01-01T12:00:00+00:00", "window_seconds": 600}
    p = parse(_Msg(json.dumps(fixed).encode()), 300)
    assert (p.window_start, p.window_seconds) == (T0, 600)
    for junk in (b"[]", b"not json", json.dumps({**entry, "delivery_id": "x"}).encode()):
        try:
            parse(_Msg(junk), 300)
        except (ValueError, KeyError, TypeError):
            continue
        raise AssertionError(f"accepted {junk!r}")
