"""``herald demo``: a burst of sample events through a running stack, then a report."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import http_ece
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from channels.push import b64url
from config.settings import Settings
from core.errors import HeraldError
from core.webhooks import new_secret
from herald.inspect import read_topic, wait_committed
from herald.processes import INGEST_GROUP, herald_groups
from herald.produce import ReceiverClient
from producers.publisher import KafkaPublisher, OutRecord, Position
from producers.signatures import scheme_for
from producers.topics import Topics
from storage.db import Database
from storage.preferences import add_endpoint, set_preferences

# Final delivery statuses: the demo waits for every webhook delivery of its run to reach one.
FINAL = ("sent", "failed", "skipped")


class LoopbackReceiver:
    """The demo's webhook receiver on 127.0.0.1: checks every signature, counts what came.

    ``/ok`` accepts; ``/flaky`` answers 503 to the first try of each delivery (herald
    retries it from a retry topic); ``/reject`` answers 422 (dead-lettered at once).
    It lives as long as the process that started it (``herald dev --demo``: the stack).
    """

    def __init__(self) -> None:
        self.secret = new_secret()
        self.verified = 0
        self.bad_signatures = 0
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                self._reply(receiver.answer(self.path, dict(self.headers.items()), body))

            def _reply(self, code: int) -> None:
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="demo-receiver", daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_port}{path}"

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        try:
            Webhook(self.secret).verify(body, headers)
        except WebhookVerificationError:
            with self._lock:
                self.bad_signatures += 1
            return 401
        msg_id = headers.get("webhook-id") or headers.get("Webhook-Id") or ""
        with self._lock:
            self.verified += 1
            if path == "/reject":
                code = 422
            elif path == "/flaky" and (path, msg_id) not in self._seen:
                self._seen.add((path, msg_id))
                code = 503
            else:
                code = 200
        return code


class LoopbackPush(LoopbackReceiver):
    """The demo's Web Push service on 127.0.0.1, holding the demo browser's subscription key:
    it checks the VAPID signature (py-vapid), decrypts each message (http-ece) and counts it."""

    def __init__(self) -> None:
        super().__init__()
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._auth = os.urandom(16)
        self.decrypted = 0
        self.refused = 0

    def subscription(self) -> str:
        """The browser's ``PushSubscription`` JSON for ``/push``."""
        point = self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        keys = {"p256dh": b64url(point), "auth": b64url(self._auth)}
        return json.dumps({"endpoint": self.url("/push"), "keys": keys}, sort_keys=True)

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        lower = {k.lower(): v for k, v in headers.items()}
        try:
            if not Vapid02.verify(lower.get("authorization", "")):
                raise ValueError("bad VAPID signature")
            json.loads(
                http_ece.decrypt(body, private_key=self._key, auth_secret=self._auth, version="aes128gcm")
            )
        except Exception:  # noqa: BLE001 (whatever fails, the demo counts it as refused)
            with self._lock:
                self.refused += 1
            return 400
        with self._lock:
            self.decrypted += 1
        return 201


DEMO_SOURCE = "dev"


STORM = 30


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
    events.append(
        ev(type="security.login", title="New sign-in from Lisbon", user_id=dave, severity="critical")
    )
    # A storm: a disk alert firing every few seconds for bob. One digest, not 30 webhooks.
    events += [
        ev(
            type="alert.disk",
            title=f"Disk 91% full on db-1 (check {i})",
            user_id=bob,
            severity="warning",
            batch_key="alert:disk-db-1",
            target_url="/alerts/disk-db-1",
        )
        for i in range(STORM)
    ]
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


def run_demo(
    settings: Settings, receiver_url: str | None = None, mail: Callable[[], int] | None = None
) -> int:
    """The demo burst and its report; ``mail`` counts the messages herald dev's catcher holds."""
    run = uuid.uuid4().hex[:6]
    hooks = LoopbackReceiver()
    pushes = LoopbackPush()
    db = Database.from_settings(settings)
    try:
        # Webhooks: alice has a good and a flaky endpoint, bob a good one, dave one that refuses.
        for user, paths in (("alice", ("/ok", "/flaky")), ("bob", ("/ok",)), ("dave", ("/reject",))):
            set_preferences(db, f"{user}-{run}", {"webhook": True})
            for path in paths:
                add_endpoint(db, f"{user}-{run}", "webhook", hooks.url(path), hooks.secret)
        set_preferences(db, f"alice-{run}", {"email": True, "push": True})
        add_endpoint(db, f"alice-{run}", "email", "alice@example.com")
        add_endpoint(db, f"alice-{run}", "push", pushes.subscription())
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
    print(f"demo {run}: processed in {time.monotonic() - started:.1f}s", flush=True)
    print(
        f"demo {run}: waiting for webhook deliveries (a retry tier is {settings.delivery.retry_tiers[0]}) ..."
    )
    webhooks = wait_webhooks(settings, run, timeout=90)
    emails = wait_webhooks(settings, run, timeout=30, channel="email")
    push = wait_webhooks(settings, run, timeout=30, channel="push")
    print(f"demo {run}: waiting for the digest windows to close (window end + grace) ...", flush=True)
    digests = wait_digests(settings, run, timeout=90)
    print()
    report(settings, run, events, {o for _, _, o in positions})
    print_webhooks(webhooks, hooks)
    print_emails(emails, mail)
    sent = sum(1 for status, _, _ in push if status == "sent")
    print(
        f"  push messages sent       {sent}  (the loopback push service decrypted {pushes.decrypted}, "
        f"refused {pushes.refused})",
        flush=True,
    )
    print_digests(digests, run)
    print_lag(settings)
    print(
        '\n  look: psql "$HERALD_DATABASE_URL" -c '  # noqa: S608 (a hint printed for the operator)
        f"\"SELECT user_id, severity, title, hidden FROM notifications WHERE source = 'demo-{run}'\"\n"
        '        psql "$HERALD_DATABASE_URL" -c "SELECT user_id, status, status_reason, attempts'
        " FROM deliveries WHERE channel = 'webhook' ORDER BY created_at DESC LIMIT 20\"",
        flush=True,
    )
    return 0


def print_lag(settings: Settings) -> None:
    """What ``herald lag`` and the lag exporter see once the burst has settled."""
    from consumers.offsets import lag

    rows = lag(settings, herald_groups())
    late = [r for r in rows if r.waiting]
    parked = sum(r.lag for r in rows if r.lag and not r.waiting)
    groups = len({r.group for r in rows})
    line = f"  consumer lag             {sum(r.lag for r in late)} records late on {groups} groups"
    if late:
        line += f", the oldest {max(r.lag_seconds for r in late):.1f}s old"
    if parked:
        line += f"; {parked} waiting for their retry tier (not late)"
    print(line + "  (herald lag; herald_consumer_lag_* on the lag exporter)", flush=True)


def _delivery_rows(settings: Settings, run: str, channel: str) -> list[tuple[str, int, str]]:
    db = Database.from_settings(settings)
    try:
        with db.transaction() as cur:
            cur.execute(
                "SELECT status, attempts, coalesce(status_reason, '') FROM deliveries"
                " WHERE channel = %s AND route = 'immediate' AND user_id LIKE %s",
                (channel, f"%-{run}"),
            )
            return [(str(r[0]), int(str(r[1])), str(r[2])) for r in cur.fetchall()]
    finally:
        db.close()


def wait_webhooks(
    settings: Settings, run: str, timeout: float, channel: str = "webhook"
) -> list[tuple[str, int, str]]:
    """Until every delivery of this run on ``channel`` is final (or ``timeout``: then as they stand)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = _delivery_rows(settings, run, channel)
        if rows and all(status in FINAL for status, _, _ in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _digest_rows(settings: Settings, run: str) -> list[tuple[str, str, str, str, int]]:
    db = Database.from_settings(settings)
    try:
        with db.transaction() as cur:
            cur.execute(
                "SELECT user_id, channel, batch_key, status, item_count FROM digest_windows"
                " WHERE user_id LIKE %s ORDER BY user_id, channel, batch_key, sequence",
                (f"%-{run}",),
            )
            return [(str(r[0]), str(r[1]), str(r[2]), str(r[3]), int(str(r[4]))) for r in cur.fetchall()]
    finally:
        db.close()


def wait_digests(settings: Settings, run: str, timeout: float) -> list[tuple[str, str, str, str, int]]:
    """Until every digest window of this run closed (or ``timeout``: then as they stand)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = _digest_rows(settings, run)
        if rows and all(r[3] != "open" for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def print_digests(rows: list[tuple[str, str, str, str, int]], run: str) -> None:
    status = Counter(r[3] for r in rows)
    storm = [r for r in rows if r[0] == f"bob-{run}" and r[1] == "webhook" and r[2] == "alert:disk-db-1"]
    sent = [r for r in storm if r[3] == "sent"]
    still = (
        " (its window is still open: HERALD_POLICY__DIGEST_SECONDS shortens it)"
        if len(sent) < len(storm)
        else ""
    )
    lines = [
        f"digest windows           {len(rows)}  ({_counts(status)}; one per user, channel and batch key)",
        f"the disk-alert storm     {sum(r[4] for r in storm)} warnings -> {len(sent)} webhook digest"
        f"{'' if len(sent) == 1 else 's'} for bob{still}",
    ]
    print("\n".join(f"  {line}" for line in lines), flush=True)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counter.items()) or "none"


def print_webhooks(rows: list[tuple[str, int, str]], hooks: LoopbackReceiver) -> None:
    sent = [r for r in rows if r[0] == "sent"]
    failed = Counter(reason for status, _, reason in rows if status == "failed")
    pending = [r for r in rows if r[0] not in FINAL]
    lines = [
        f"webhooks sent            {len(sent)}  ({sum(1 for r in sent if r[1] > 1)} after a retry)",
        f"webhooks dead-lettered   {sum(failed.values())}  ({_counts(failed)})",
        f"loopback receiver        {hooks.verified} signed requests verified, {hooks.bad_signatures} refused",
    ]
    if pending:
        lines.append(f"webhooks still retrying  {len(pending)}")
    print("\n".join(f"  {line}" for line in lines), flush=True)


def print_emails(rows: list[tuple[str, int, str]], mail: Callable[[], int] | None) -> None:
    sent = [r for r in rows if r[0] == "sent"]
    other = Counter(f"{status} {reason}".strip() for status, _, reason in rows if status != "sent")
    lines = [f"emails sent              {len(sent)}  ({_counts(other) if other else 'all of them'})"]
    if mail is not None:
        lines.append(f"mail catcher             {mail()} messages kept (the path is printed above)")
    print("\n".join(f"  {line}" for line in lines), flush=True)


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
    ]
    print("\n".join(f"  {line}" if line else "" for line in lines), flush=True)


def _offset(headers: dict[str, bytes]) -> int:
    raw = headers.get("kafka_dlt-original-offset", b"")
    return int.from_bytes(raw, "big", signed=True) if len(raw) == 8 else -1


def send_center_samples(settings: Settings, user: str) -> None:
    """A few notifications for ``user``, whose notification center ``herald dev`` printed:
    the page shows them arrive live (and the titles as text, the last one included)."""
    run = uuid.uuid4().hex[:6]
    now = datetime.now(UTC).isoformat()
    samples = [
        {
            "type": "invoice.paid",
            "title": "Invoice INV-7 was paid",
            "severity": "success",
            "summary": "4,200.00 EUR received from Acme GmbH.",
            "target_url": "/billing/invoices/INV-7",
        },
        {
            "type": "deploy.failed",
            "title": "Deploy 41 failed",
            "severity": "critical",
            "summary": "The health check of api-7 did not pass; rolled back.",
            "target_url": "/deploys/41",
        },
        {"type": "comment.added", "title": "New comment on 'Q3 plan'", "summary": "Dana: looks good to me."},
        {
            "type": "security.probe",
            "title": "<img src=x onerror=alert(1)> shows as text",
            "summary": "Titles and summaries are never rendered as HTML.",
        },
    ]
    topics = Topics(settings.topic_prefix)
    records = [
        OutRecord(
            topics.events,
            json.dumps(
                {
                    "id": f"center-{run}-{i}",
                    "source": "herald-dev",
                    "user_id": user,
                    "occurred_at": now,
                    **sample,
                }
            ).encode(),
            key=user.encode(),
        )
        for i, sample in enumerate(samples)
    ]
    publisher = KafkaPublisher(settings)
    try:
        publisher.publish(records)
    finally:
        publisher.close()
    print(f"demo: {len(records)} notifications for {user}: open the center URL above to see them", flush=True)
