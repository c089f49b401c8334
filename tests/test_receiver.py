"""``herald receiver`` over real HTTP on loopback, against the real broker and PostgreSQL.

What it proves: the error answers (404, 415, 413, 401) put nothing on the topic; a 202 is
one record with the raw body, its key and the headers the shipped rules need; under
concurrent load with redeliveries every 202 is exactly one record and ingest makes one
notification per distinct event; /healthz and /metrics.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from config.settings import Settings
from herald.inspect import Record, read_topic
from producers.signatures import scheme_for
from producers.topics import Topics
from tests.helpers import ingest
from tests.receiver_helpers import Client, receiver_settings, running_receiver

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "samples"
Conn = psycopg.Connection[tuple[object, ...]]


def sign(settings: Settings, source: str, body: bytes, event_id: str) -> dict[str, str]:
    return scheme_for(settings.receiver.sources[source]).sign(body, event_id=event_id)


def envelope(event_id: str, user: str = "u-1") -> bytes:
    return json.dumps({"id": event_id, "type": "comment.added", "title": "Hi", "user_id": user}).encode()


def events(settings: Settings) -> list[Record]:
    return read_topic(settings, Topics(settings.topic_prefix).events)


def requests_total(source: str, outcome: str) -> float:
    labels = {"source": source, "outcome": outcome}
    return REGISTRY.get_sample_value("herald_receiver_requests_total", labels) or 0.0


def test_refused_requests_get_their_status_and_put_nothing_on_the_topic(settings: Settings) -> None:
    s = receiver_settings(settings, max_body_bytes=1024)
    body = envelope("evt-refused")
    before = {o: requests_total("sw", o) for o in ("too_large", "unsupported_media_type", "unauthorized")}
    unknown_before = requests_total("unknown", "unknown_source")
    with running_receiver(s) as run:
        c = Client(run.url)
        signed = sign(s, "sw", body, "msg-1")

        r = c.post("/webhooks/nope", body, signed)
        assert r.status == 404 and r.headers["content-type"] == "application/problem+json"
        assert json.loads(r.body)["status"] == 404

        for ctype in ("text/plain", "application/x-www-form-urlencoded", ""):
            r = c.request("POST", "/webhooks/sw", body, {**signed, "Content-Type": ctype})
            assert r.status == 415, ctype

        big = b'{"pad": "' + b"x" * 1100 + b'"}'
        r = c.post("/webhooks/sw", big, sign(s, "sw", big, "msg-big"))
        assert r.status == 413
        # Without Content-Length (chunked), the limit holds while reading.
        chunked = iter([big[:600], big[600:]])
        r = c.request(
            "POST",
            "/webhooks/sw",
            chunked,
            {**sign(s, "sw", big, "msg-big"), "Content-Type": "application/json"},
        )  # type: ignore[arg-type]
        assert r.status == 413

        r = c.post("/webhooks/sw", body, {})
        assert r.status == 401 and "missing webhook-id" in json.loads(r.body)["detail"]
        r = c.post("/webhooks/sw", body + b" ", signed)  # tampered
        assert r.status == 401 and json.loads(r.body)["detail"] == "no matching signature"
        stale = scheme_for(s.receiver.sources["sw"]).sign(body, event_id="msg-old", now=time.time() - 600)
        r = c.post("/webhooks/sw", body, stale)
        assert r.status == 401 and "too old" in json.loads(r.body)["detail"]
        r = c.post("/webhooks/gh", body, {"X-Hub-Signature-256": "sha256=" + "0" * 64})
        assert r.status == 401

        # And one good request, so that reading the topic below is not vacuous.
        r = c.post("/webhooks/sw", body, signed)
        assert r.status == 202, r.body
        c.close()
    recs = events(s)
    assert [r.key for r in recs] == [b"sw:msg-1"]
    assert requests_total("sw", "too_large") - before["too_large"] == 2
    assert requests_total("sw", "unsupported_media_type") - before["unsupported_media_type"] == 3
    assert requests_total("sw", "unauthorized") - before["unauthorized"] == 3
    assert requests_total("unknown", "unknown_source") - unknown_before == 1


def test_shipped_rules_match_what_came_through_the_receiver(settings: Settings, db: Conn) -> None:
    """GitHub and Stripe samples, signed as their senders sign; raw bytes, key and headers on the
    record; then ingest with config/rules makes the notifications those rules promise."""
    s = receiver_settings(settings)
    gh_body = (SAMPLES / "github_issue_comment.json").read_bytes()
    gh_headers = dict(
        line.split("=", 1)
        for line in (SAMPLES / "github_issue_comment.headers").read_text().splitlines()
        if line
    )
    gh_headers.pop("X-Hub-Signature-256")  # signed for another secret: sign with ours
    stripe_body = (SAMPLES / "stripe_invoice_payment_failed.json").read_bytes()
    sw_body = envelope("sw-evt-1", user="sw-user")
    with running_receiver(s) as run:
        c = Client(run.url)
        # GitHub signs with the newer of the two secrets the source holds (a rotation).
        from producers.signatures import github

        gh_sig = github([b"gh-new-secret"]).sign(gh_body, event_id=gh_headers["X-GitHub-Delivery"])
        r = c.post("/webhooks/gh", gh_body, {**gh_headers, **gh_sig})
        assert r.status == 202, r.body
        r = c.post("/webhooks/stripe", stripe_body, sign(s, "stripe", stripe_body, "-"))
        assert r.status == 202, r.body
        r = c.post("/webhooks/sw", sw_body, sign(s, "sw", sw_body, "msg_sw_1"))
        assert r.status == 202, r.body
        c.close()
    recs = {r.key: r for r in events(s)}
    delivery = gh_headers["X-GitHub-Delivery"]
    gh = recs[f"gh:{delivery}".encode()]
    assert gh.value == gh_body  # the raw bytes, untouched
    assert gh.headers["herald-source"] == b"gh"
    assert gh.headers["X-GitHub-Event"] == b"issue_comment"
    assert gh.headers["X-GitHub-Delivery"] == delivery.encode()
    assert "X-Hub-Signature-256" not in gh.headers
    stripe = recs[b"stripe:evt_1OzQ4u2eZvKYlo2CsWq1Rk3b"]  # keyed by the event id in the body
    assert stripe.value == stripe_body and stripe.headers["herald-source"] == b"stripe"
    sw = recs[b"sw:msg_sw_1"]
    assert sw.headers["webhook-id"] == b"msg_sw_1" and sw.headers["herald-source"] == b"sw"

    positions = [(r.topic, r.partition, r.offset) for r in recs.values()]
    ingest(s.model_copy(update={"rules_file": ROOT / "config" / "rules"}), positions)
    rows = db.execute("SELECT user_id, severity, source FROM notifications ORDER BY user_id").fetchall()
    assert ("octocat", "info", "github") in rows  # the author
    assert {("mona-lisa", "warning", "github"), ("defunkt", "warning", "github")} <= set(rows)  # @mentions
    assert ("cus_PpQ8nAz1LmR2sT", "critical", "stripe") in rows
    # A native envelope through the receiver takes its source from herald-source.
    assert ("sw-user", "info", "sw") in rows
    assert len(rows) == 5


def test_concurrent_load_with_redeliveries(settings: Settings, db: Conn) -> None:
    """Every 202 is exactly one record (counted by webhook-id), redeliveries included; after
    ingest, one notification per distinct event."""
    s = receiver_settings(settings)
    distinct = 240
    ids = [f"msg_{uuid.uuid4().hex[:12]}" for _ in range(distinct)]
    bodies = {i: envelope(i, user=f"load-{n % 17}") for n, i in enumerate(ids)}
    sends = ids + ids[::4] + ids[::10]  # 84 redeliveries: same id, same body, new signature
    with running_receiver(s) as run:
        scheme = scheme_for(s.receiver.sources["sw"])

        def worker(chunk: list[str]) -> list[tuple[str, int]]:
            c = Client(run.url)
            out = []
            for i in chunk:
                r = c.post("/webhooks/sw", bodies[i], scheme.sign(bodies[i], event_id=i))
                out.append((i, r.status))
            c.close()
            return out

        chunks = [sends[n::16] for n in range(16)]
        with ThreadPoolExecutor(16) as pool:
            results = [pair for part in pool.map(worker, chunks) for pair in part]
    assert Counter(status for _, status in results) == {202: len(sends)}
    accepted = Counter(i for i, status in results if status == 202)
    recs = events(s)
    on_topic = Counter(r.headers["webhook-id"].decode() for r in recs)
    assert on_topic == accepted  # exactly one record per 202, duplicates present too
    assert sum(on_topic.values()) == distinct + len(ids[::4]) + len(ids[::10])
    # A redelivery lands on the partition of its first copy (same key).
    partitions: dict[bytes | None, set[int]] = {}
    for r in recs:
        partitions.setdefault(r.key, set()).add(r.partition)
    assert all(len(p) == 1 for p in partitions.values())

    ingest(s, [(r.topic, r.partition, r.offset) for r in recs])
    row = db.execute("SELECT count(*), count(DISTINCT idempotency_key) FROM notifications").fetchone()
    assert row == (distinct, distinct)


def test_healthz_on_both_ports_and_metrics(settings: Settings) -> None:
    s = receiver_settings(settings).model_copy(update={"metrics_port": 0})
    with running_receiver(s) as run:
        c = Client(run.url)
        assert c.request("GET", "/healthz").status == 200
        body = envelope("evt-m")
        assert c.post("/webhooks/sw", body, sign(s, "sw", body, "msg-m")).status == 202
        c.close()
        assert run.metrics_port
        m = Client(f"http://127.0.0.1:{run.metrics_port}")
        assert m.request("GET", "/healthz").status == 200
        text = m.request("GET", "/metrics").body.decode()
        m.close()
    assert 'herald_receiver_requests_total{outcome="accepted",source="sw"}' in text
    assert "herald_receiver_request_seconds_bucket" in text
    assert "herald_receiver_producer_queue" in text


def _stop_while_in_flight(s: Settings, n: int) -> tuple[list[Any], list[Record]]:
    """Stop the receiver as soon as one request was accepted, with others in flight; return
    every request's reply (a status, or the error of a request the stopped server refused)."""
    replies: list[Any] = []
    first = threading.Event()
    with running_receiver(s) as run:
        scheme = scheme_for(s.receiver.sources["sw"])
        bodies = [envelope(f"evt-{k}") for k in range(n)]

        def one(k: int) -> Any:
            c = Client(run.url)
            try:
                status = c.post("/webhooks/sw", bodies[k], scheme.sign(bodies[k], event_id=f"msg-{k}")).status
                if status == 202:
                    first.set()
                return status
            except OSError as exc:
                return exc
            finally:
                c.close()

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, k) for k in range(n)]
            assert first.wait(30), "no request was accepted"
            run.stop()  # as SIGTERM does
            replies = [f.result() for f in futures]
    return replies, events(s)


def test_graceful_stop_answers_requests_in_flight_and_loses_none(settings: Settings) -> None:
    replies, recs = _stop_while_in_flight(receiver_settings(settings), 80)
    accepted = {f"msg-{k}" for k, r in enumerate(replies) if r == 202}
    assert accepted, replies
    assert accepted <= {r.headers["webhook-id"].decode() for r in recs}
