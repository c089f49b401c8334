"""``herald demo``: a burst of sample events through a running stack, then a report."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from config.settings import Settings
from core.errors import HeraldError
from herald.inspect import read_topic, wait_committed
from herald.processes import INGEST_GROUP
from herald.produce import ReceiverClient
from producers.publisher import KafkaPublisher, OutRecord, Position
from producers.signatures import scheme_for
from producers.topics import Topics
from storage.db import Database
from storage.preferences import add_endpoint, set_preferences

DEMO_SOURCE = "dev"
PUSH_SUB = '{"endpoint":"https://push.example/abc","keys":{"p256dh":"BAbc","auth":"xyz"}}'


def sample_events(run: str) -> list[dict[str, Any] | bytes]:
    """What a busy minute looks like: criticals, a flapping job, chatter, repeats, junk."""
    src = f"demo-{run}"
    now = datetime.now(UTC).isoformat()

    def ev(**f: Any) -> dict[str, Any]:
        return {"id": uuid.uuid4().hex, "source": src, "occurred_at": now, **f}

    alice, bob, carol, dave = (f"{name}-{run}" for name in ("alice", "bob", "carol", "dave"))
    paid = ev(
        type="invoice.payment_failed",
        title="Payment failed for invoice INV-1",
        user_id=alice,
        severity="critical",
        resource_id="INV-1",
        target_url="/billing/invoices/INV-1",
        body="Card 4242 4242 4242 4242 was declined.",
        data={"amount": 4200},
    )
    retry = {**paid, "id": uuid.uuid4().hex}  # the same invoice failing again: one notification
    comment = ev(type="comment.added", title="New comment on 'Q3 plan'", user_id=bob, severity="info")
    events: list[dict[str, Any] | bytes] = [paid, retry, comment, comment]
    events += [
        ev(
            type="job.failed",
            title=f"Nightly export failed (attempt {i})",
            user_id=u,
            severity="warning",
            batch_key="job:nightly-export",
        )
        for i in range(5)
        for u in (alice, bob)
    ]
    events.append(ev(type="api_key.created", title="API key created", user_id=carol, severity="success"))
    events += [
        ev(
            type="deploy.failed",
            title=f"Deploy {i} failed",
            user_id=bob,
            severity="critical",
            target_url=f"/deploys/{i}",
        )
        for i in range(7)
    ]
    events.append(
        ev(
            type="maintenance.scheduled",
            title="Maintenance tonight",
            severity="warning",
            recipients=[alice, bob, carol, dave],
        )
    )
    events.append(b'{"id": "broken", "title": oops}')
    return events


# Sample events the demo sends through the webhook receiver (when one runs) rather than
# straight to the topic: the same events, so the report is the same either way.
VIA_RECEIVER = ("comment.added", "api_key.created")


def post_via_receiver(settings: Settings, url: str, events: list[dict[str, Any]]) -> list[Position]:
    """Sign each event as a Standard Webhooks sender would and POST it to the ``dev`` source;
    a 202 says where the broker stored it."""
    scheme = scheme_for(settings.receiver.sources[DEMO_SOURCE])
    client = ReceiverClient(url)
    positions: list[Position] = []
    try:
        for e in events:
            body = json.dumps(e).encode()
            headers = {
                "Content-Type": "application/json",
                **scheme.sign(body, event_id=f"msg_{uuid.uuid4().hex}"),
            }
            status, _, data = client.post(f"/webhooks/{DEMO_SOURCE}", body, headers)
            if status != 202:
                raise HeraldError(f"the receiver at {url} answered {status} to a demo event")
            reply = json.loads(data)
            positions.append((reply["topic"], reply["partition"], reply["offset"]))
    finally:
        client.close()
    return positions


def run_demo(settings: Settings, receiver_url: str | None = None) -> int:
    run = uuid.uuid4().hex[:6]
    db = Database.from_settings(settings)
    try:
        set_preferences(db, f"alice-{run}", {"email": True, "push": True})
        add_endpoint(db, f"alice-{run}", "email", "alice@example.com")
        add_endpoint(db, f"alice-{run}", "push", PUSH_SUB)
        set_preferences(db, f"bob-{run}", {"email": True})
        add_endpoint(db, f"bob-{run}", "email", "bob@example.com")
        set_preferences(db, f"carol-{run}", {"in_app": False, "email": True})
    finally:
        db.close()
    topics = Topics(settings.topic_prefix)
    events = sample_events(run)
    use_receiver = bool(receiver_url) and DEMO_SOURCE in settings.receiver.sources
    posted = [e for e in events if use_receiver and isinstance(e, dict) and e["type"] in VIA_RECEIVER]
    records = [
        OutRecord(topics.events, e if isinstance(e, bytes) else json.dumps(e).encode(), key=run.encode())
        for e in events
        if not any(e is p for p in posted)
    ]
    publisher = KafkaPublisher(settings)
    positions = publisher.publish(records)
    publisher.close()
    via = ""
    if posted and receiver_url:
        positions += post_via_receiver(settings, receiver_url, posted)
        via = f" and {len(posted)} through the webhook receiver ({receiver_url})"
    print(
        f"\ndemo {run}: sent {len(records)} records to {topics.events}{via}; waiting for ingest ...",
        flush=True,
    )
    started = time.monotonic()
    targets: dict[tuple[str, int], int] = {}
    for t, p, o in positions:
        targets[(t, p)] = max(o, targets.get((t, p), -1))
    wait_committed(settings, INGEST_GROUP, targets, timeout=120)
    print(f"demo {run}: processed in {time.monotonic() - started:.1f}s\n", flush=True)
    report(settings, run, events, {o for _, _, o in positions})
    return 0


def report(settings: Settings, run: str, events: list[dict[str, Any] | bytes], offsets: set[int]) -> None:
    db = Database.from_settings(settings)
    try:
        with db.transaction() as cur:
            cur.execute(
                "SELECT count(*), count(*) FILTER (WHERE hidden) FROM notifications WHERE source = %s",
                (f"demo-{run}",),
            )
            stored, hidden = cur.fetchone() or (0, 0)
            cur.execute(
                "SELECT d.channel, d.route, coalesce(d.reason, ''), count(*) FROM deliveries d"
                " JOIN notifications n ON n.id = d.notification_id WHERE n.source = %s"
                " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                (f"demo-{run}",),
            )
            rows = cur.fetchall()
    finally:
        db.close()
    expanded = sum(len(e.get("recipients") or [1]) for e in events if isinstance(e, dict))
    immediate: Counter[str] = Counter()
    digest: Counter[str] = Counter()
    for channel, route, reason, n in rows:
        if route == "immediate":
            immediate[str(channel)] += int(str(n))
        else:
            digest[str(reason)] += int(str(n))
    dead = [
        r
        for r in read_topic(settings, Topics(settings.topic_prefix).events_dlq)
        if r.headers.get("herald-dlt-reason") and _offset(r.headers) in offsets
    ]
    reasons = Counter(r.headers["herald-dlt-reason"].decode() for r in dead)
    n_stored, n_hidden = int(str(stored)), int(str(hidden))
    queued = ", ".join(f"{c} {n}" for c, n in sorted(immediate.items())) or "none"
    lines = [
        f"notifications stored     {n_stored}  ({n_hidden} hidden: in-app off)",
        f"duplicates dropped       {expanded - n_stored}",
        f"deliveries queued now    {queued}",
        f"sent to digests          {digest['warning']} warnings, "
        f"{digest['rate_limited']} rate-limited criticals",
        f"dead-letter records      {len(dead)}  ({', '.join(f'{k}: {v}' for k, v in reasons.items())})",
        "",
        'look: psql "$HERALD_DATABASE_URL" -c '  # noqa: S608 (a hint printed for the operator)
        f"\"SELECT user_id, severity, title, hidden FROM notifications WHERE source = 'demo-{run}'\"",
    ]
    print("\n".join(f"  {line}" if line else "" for line in lines), flush=True)


def _offset(headers: dict[str, bytes]) -> int:
    raw = headers.get("kafka_dlt-original-offset", b"")
    return int.from_bytes(raw, "big", signed=True) if len(raw) == 8 else -1
