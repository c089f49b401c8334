"""Plugging into an existing bus, end to end: CloudEvents, shipped rules, rule errors, replays."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from config.settings import Settings
from consumers.dlq import H_MESSAGE, H_REASON, decode_headers
from core.errors import ConfigError
from herald.inspect import read_topic
from herald.processes import run_ingest
from producers.publisher import Position
from producers.topics import Topics
from tests.helpers import ingest, produce

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "samples"
SHIPPED = ROOT / "config" / "rules"

Conn = psycopg.Connection[tuple[object, ...]]


def with_rules(settings: Settings, path: Path = SHIPPED) -> Settings:
    return settings.model_copy(update={"rules_file": path})


def sample(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SAMPLES / name).read_bytes())
    return loaded


def github_headers(delivery: str | None = None) -> list[tuple[str, bytes]]:
    lines = (SAMPLES / "github_issue_comment.headers").read_text().splitlines()
    out = [(k, v.encode()) for k, _, v in (line.partition("=") for line in lines if line)]
    if delivery:
        out = [(k, delivery.encode() if k == "X-GitHub-Delivery" else v) for k, v in out]
    return out


def rows(db: Conn, sql: str = "") -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT user_id, type, source, severity, title, batch_key, target_url, idempotency_key "
        f"FROM notifications {sql} ORDER BY user_id, type"
    ).fetchall()


def count(db: Conn) -> int:
    row = db.execute("SELECT count(*) FROM notifications").fetchone()
    assert row is not None
    return int(str(row[0]))


def content_keys() -> float:
    return REGISTRY.get_sample_value("herald_ingest_content_keys_total") or 0.0


# --- CloudEvents ---------------------------------------------------------------------------------


def test_cloudevents_in_both_modes_without_any_rules(settings: Settings, db: Conn) -> None:
    structured = {
        "specversion": "1.0",
        "id": "ce-s-1",
        "source": "/billing",
        "type": "com.acme.invoice.failed",
        "subject": "subject-user",
        "time": "2030-05-06T07:08:09Z",
        "datacontenttype": "application/json",
        "data": {"title": "Invoice failed", "severity": "critical", "resource_id": "inv-1"},
    }
    pos = produce(settings, [structured], headers=[("content-type", b"application/cloudevents+json")])
    binary_attrs = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"ce-b-1"),
        ("ce_source", b"/deploys"),
        ("ce_type", b"com.acme.deploy.done"),
        ("ce_subject", b"ignored-subject"),
        ("ce_time", b"2030-05-06T07:08:10Z"),
        ("content-type", b"application/json"),
    ]
    data = {"title": "Deploy finished", "severity": "success", "recipients": ["r1", "r2"]}
    pos += produce(settings, [data], headers=binary_attrs)
    run = ingest(settings, pos)
    assert run.handler.totals.invalid == 0
    got = rows(db)
    assert [r[0] for r in got] == ["r1", "r2", "subject-user"]  # data wins over subject
    by_user = {r[0]: r for r in got}
    assert by_user["subject-user"][1:4] == ("com.acme.invoice.failed", "/billing", "critical")
    assert by_user["subject-user"][7] == "r:23:com.acme.invoice.failed:inv-1"
    assert by_user["r1"][1:4] == ("com.acme.deploy.done", "/deploys", "success")
    assert by_user["r1"][7] == "s:8:/deploys:ce-b-1"
    occurred = db.execute("SELECT occurred_at FROM notifications WHERE user_id = 'subject-user'").fetchone()
    assert occurred is not None and str(occurred[0]).startswith("2030-05-06 07:08:09")


# --- shipped rules --------------------------------------------------------------------------------


def shipped_stream(settings: Settings) -> list[Position]:
    pos = produce(settings, [sample("stripe_invoice_payment_failed.json")])
    pos += produce(settings, [sample("github_issue_comment.json")], headers=github_headers())
    job = sample("job_failed.json")
    other_run = {**job, "run": {**job["run"], "number": 9813}, "finished_at": "2024-04-03T02:17:45Z"}
    pos += produce(settings, [job, other_run])
    return pos


def test_shipped_rules_on_real_samples(settings: Settings, db: Conn) -> None:
    s = with_rules(settings)
    run = ingest(s, shipped_stream(s))
    assert run.handler.totals.invalid == 0
    got = {(r[0], r[1]): r for r in rows(db)}
    assert set(got) == {
        ("cus_PpQ8nAz1LmR2sT", "invoice.payment_failed"),
        ("octocat", "github.issue_comment"),
        ("mona-lisa", "github.mention"),
        ("defunkt", "github.mention"),
        ("user-42", "job.failed"),
    }
    stripe = got[("cus_PpQ8nAz1LmR2sT", "invoice.payment_failed")]
    assert stripe[2:4] == ("stripe", "critical")
    assert str(stripe[6]).startswith("https://invoice.stripe.com/i/")
    assert got[("octocat", "github.issue_comment")][3] == "info"
    assert got[("mona-lisa", "github.mention")][3:6] == (
        "warning",
        "hubot mentioned you in acme/widgets#1347",
        "github:acme/widgets",
    )
    jobs = rows(db, "WHERE user_id = 'user-42'")
    assert len(jobs) == 2  # two runs of the same job: two notifications, one batch key
    assert {r[5] for r in jobs} == {"job:nightly-export"} and {r[3] for r in jobs} == {"warning"}
    assert all(str(r[7]).startswith("h:sha256:") for r in jobs)


def test_a_mapped_warning_goes_to_the_digest_batched_by_its_key(settings: Settings, db: Conn) -> None:
    db.execute("INSERT INTO notification_preferences (user_id, email) VALUES ('mona-lisa', true)")
    s = with_rules(settings)
    ingest(s, produce(s, [sample("github_issue_comment.json")], headers=github_headers()))
    digests = [json.loads(r.value or b"") for r in read_topic(s, Topics(s.topic_prefix).digests_pending)]
    assert [(d["user_id"], d["batch_key"], d["reason"]) for d in digests] == [
        ("mona-lisa", "github:acme/widgets", "warning")
    ]


# --- rule errors ----------------------------------------------------------------------------------


def test_unmapped_and_unmappable_records_are_dead_lettered(settings: Settings, db: Conn) -> None:
    s = with_rules(settings)
    no_url = sample("stripe_invoice_payment_failed.json")
    del no_url["data"]["object"]["hosted_invoice_url"]
    foreign = {"kind": "build.started", "build": 7}
    pos = produce(s, [foreign, no_url, sample("job_failed.json")])
    run = ingest(s, pos)
    dlq = read_topic(s, Topics(s.topic_prefix).events_dlq)
    reasons = sorted(decode_headers(r.headers)[H_REASON] for r in dlq)
    assert reasons == ["mapping", "unmapped"]
    by_reason = {decode_headers(r.headers)[H_REASON]: r for r in dlq}
    assert by_reason["unmapped"].value == json.dumps(foreign).encode()
    assert "hosted_invoice_url" in str(decode_headers(by_reason["mapping"].headers)[H_MESSAGE])
    assert run.handler.totals.invalid == 2
    assert [r[0] for r in rows(db)] == ["user-42"]  # the good record behind them went through


def test_schema_violations_of_native_events_stay_schema_with_rules(settings: Settings, db: Conn) -> None:
    s = with_rules(settings)
    bad = {"id": "n1", "type": "t", "title": "x", "user_id": "u", "severity": "fatal"}
    ingest(s, produce(s, [bad]))
    (dead,) = read_topic(s, Topics(s.topic_prefix).events_dlq)
    assert decode_headers(dead.headers)[H_REASON] == "schema"


def test_an_invalid_rules_file_stops_ingest_before_it_starts(settings: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text(
        (SHIPPED / "stripe.toml").read_text().replace('severity = "critical"', 'severity = "urgent"')
    )
    with pytest.raises(ConfigError) as info:
        run_ingest(with_rules(settings, bad), group=f"g-{uuid.uuid4().hex[:6]}", timeout=5)
    assert "rule 'stripe-invoice-payment-failed'" in str(info.value)
    assert "severity" in str(info.value)


# --- replays --------------------------------------------------------------------------------------


def test_replaying_a_mapped_stream_creates_nothing_new(settings: Settings, db: Conn) -> None:
    s = with_rules(settings)
    positions = shipped_stream(s)
    # GitHub redelivers with a new delivery id: the comment is still the same notification.
    positions += produce(s, [sample("github_issue_comment.json")], headers=github_headers(str(uuid.uuid4())))
    before = content_keys()
    first = ingest(s, positions)
    stored = count(db)  # stripe 1, github 3 (author, two mentions), jobs 2
    assert stored == 6 and first.handler.totals.inserted == stored
    assert content_keys() - before == 2  # the two job records have no id at all
    replay = ingest(s, positions)  # a fresh group re-reads the topic from the start
    assert count(db) == stored
    assert replay.handler.totals.inserted == 0
    assert replay.handler.totals.duplicates == first.handler.totals.inserted + first.handler.totals.duplicates
