"""Structured logs in real runs (HERALD_LOG_FORMAT=json): every line is JSON, the lines about a
record or a delivery say which (topic, partition, offset, delivery_id, outcome), and no line
ever carries a payload or a secret.

The pipeline runs as an operator runs it: ``herald ingest`` and ``herald deliver`` as
subprocesses at DEBUG, over an event whose title, body, summary and data carry a marker, and
two invalid records that carry it too and get dead-lettered, with settings holding a
distinctive value for every secret herald knows. The marker does reach the webhook
endpoint (so its absence from the logs means something); it never reaches stderr.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import psycopg
import pytest
from confluent_kafka import Producer

from config.settings import Settings
from core.logs import JsonFormatter, configure
from herald.embedded import free_port
from producers.publisher import KAFKA_LOG
from producers.topics import Topics
from tests.conftest import Backend
from tests.helpers import ROOT, herald_cli, produce
from tests.receiver_helpers import SOURCES, SW_SECRET, Client, receiver_settings
from tests.test_deliver import (
    critical,
    deliver_settings,
    final,
    peer,
    rows,
    send_events,
    start_deliver,
    wait_until,
)
from tests.test_deliver import user_with as webhook_user
from tests.test_logs_unit import kept_logging
from tests.test_receiver import sign
from tests.webhook_peer import WebhookPeer

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]
__all__ = ["peer"]  # fixture

MARKER = "pii-marker-5b1e9c"
SECRETS = {
    "HERALD_API__JWT_SECRET": "jwt-secret-c0ffee-" + "9" * 24,
    "HERALD_UNSUBSCRIBE_SECRET": "unsubscribe-secret-d00d-" + "8" * 16,
    "HERALD_SMTP__USERNAME": "herald",
    "HERALD_SMTP__PASSWORD": "smtp-password-beef-7e7e7e",
    "HERALD_KAFKA__SASL_PASSWORD": "sasl-password-f00d-6d6d6d",
}
SECRET_VALUES = [v for k, v in SECRETS.items() if k != "HERALD_SMTP__USERNAME"]
DB_PASSWORD = "db-password-a5a5-4c4c4c"


def marked(user: str) -> dict[str, Any]:
    """A critical event with the marker everywhere a payload can carry it."""
    return critical(
        user,
        title=f"Payment failed {MARKER}",
        body=f"the full body {MARKER}",
        summary=f"short {MARKER}",
        data={"note": MARKER, MARKER: 1},
        resource_id=f"inv-{MARKER}",
        target_url=f"/invoices/{MARKER}",
    )


def database_url(backend: Backend) -> str:
    """The session's database, with a password in the URL when PostgreSQL ignores it (the
    embedded server trusts local connections), so that the URL is a secret too."""
    url = backend.database_url
    if backend.kind != "embedded" or "password" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}password={DB_PASSWORD}"


def cli_env(settings: Settings, backend: Backend, **more: str) -> dict[str, str]:
    return {
        "HERALD_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "HERALD_DATABASE_URL": database_url(backend),
        "HERALD_TOPIC_PREFIX": settings.topic_prefix,
        "HERALD_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "HERALD_SESSION_TIMEOUT_MS": "2000",
        "HERALD_METRICS_PORT": "-1",
        "HERALD_LOG_FORMAT": "json",
        "HERALD_LOG_LEVEL": "DEBUG",
        "HERALD_APP_URL": "https://app.example.com/",
        "HERALD_PUBLIC_URL": "https://herald.example.com",
        "HERALD_WEBHOOK__ALLOW_PRIVATE_TARGETS": "true",
        "HERALD_WEBHOOK__TIMEOUT_S": "2",
        **SECRETS,
        **more,
    }


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every line of ``stderr`` as a JSON object with the fields every line has."""
    out = []
    for text in stderr.splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {text!r}") from None
        assert isinstance(line, dict), text
        assert {"ts", "level", "logger", "message"} <= set(line), text
        out.append(line)
    return out


def assert_nothing_private(text: str, *extra: str) -> None:
    for leaked in (MARKER, DB_PASSWORD, *SECRET_VALUES, *extra):
        assert leaked not in text, f"{leaked!r} is in the log"


def test_ingest_and_deliver_log_json_with_context_and_never_a_payload_or_secret(
    db: Conn, backend: Backend, peer: WebhookPeer
) -> None:
    s = deliver_settings(backend)
    user = f"logs-{uuid.uuid4().hex[:8]}"
    webhook_user(db, s, user, peer.url("/ok"))
    topics = Topics(s.topic_prefix)
    produce(s, [marked(user)])
    invalid = produce(
        s,
        [
            json.dumps({"id": "evt-bad", "title": MARKER, "body": MARKER}).encode(),  # no type, no user
            f"not json {MARKER}".encode(),
        ],
    )
    env = cli_env(s, backend)

    ing = herald_cli(
        *("ingest", "--group", f"g-{uuid.uuid4().hex[:8]}", "--max-messages", "3", "--timeout", "40"), env=env
    )
    assert ing.returncode == 0, ing.stderr[-3000:]
    dlv = herald_cli(
        *("deliver", "--channel", "webhook", "--group", f"d-{uuid.uuid4().hex[:8]}"),
        *("--max-messages", "1", "--timeout", "40"),
        env=env,
    )
    assert dlv.returncode == 0, dlv.stderr[-3000:]

    (got,) = peer.at("/ok")
    assert MARKER in got.body.decode(), "the marker went through the pipeline"
    for out in (ing, dlv):
        assert_nothing_private(out.stderr + out.stdout)
    ingest_lines, deliver_lines = json_lines(ing.stderr), json_lines(dlv.stderr)
    assert any(x["level"] == "DEBUG" for x in ingest_lines), "DEBUG lines were written"

    dead = [x for x in ingest_lines if x.get("outcome") == "dlq"]
    assert sorted((x["topic"], x["partition"], x["offset"]) for x in dead) == sorted(
        (t, p, o) for t, p, o in invalid
    )
    assert all(x["topic"] == topics.events and x["consumer"] == "ingest" for x in dead)
    committed = [x for x in ingest_lines if x["message"].startswith("ingest: committed")]
    assert committed and all({"topic", "partition", "offset", "group"} <= set(x) for x in committed)

    (row,) = rows(db, user)
    assert row["status"] == "sent"
    sent = [x for x in deliver_lines if x.get("delivery_id") == str(row["id"])]
    assert [x["outcome"] for x in sent] == ["sent"], deliver_lines
    assert sent[0]["topic"] == topics.deliveries("webhook")
    assert sent[0]["channel"] == "webhook" and sent[0]["consumer"] == "deliver-webhook"
    assert isinstance(sent[0]["partition"], int) and isinstance(sent[0]["offset"], int)


@contextmanager
def captured_json(level: int = logging.DEBUG) -> Iterator[list[str]]:
    """Every log record of this process, formatted as a JSON line, at ``level`` and above."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Capture()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    before = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(before)


def test_the_deliverer_logs_each_delivery_with_its_id_and_outcome(
    db: Conn, backend: Backend, peer: WebhookPeer
) -> None:
    s = deliver_settings(backend)
    ok, refused = (f"{name}-{uuid.uuid4().hex[:6]}" for name in ("log-ok", "log-refused"))
    webhook_user(db, s, ok, peer.url("/ok"))
    webhook_user(db, s, refused, peer.url("/status/400"))
    with captured_json() as lines:
        send_events(s, marked(ok), marked(refused))
        runner = start_deliver(s)
        try:
            wait_until(lambda: final(db, ok)() and final(db, refused)(), what="both deliveries final")
        finally:
            runner.stop()

    assert_nothing_private("\n".join(lines))
    parsed = [json.loads(x) for x in lines]
    outcomes = {
        x["delivery_id"]: x for x in parsed if "delivery_id" in x and x.get("logger") == "consumers.deliver"
    }
    (sent,), (failed,) = rows(db, ok), rows(db, refused)
    line = outcomes[str(sent["id"])]
    assert (line["outcome"], line["level"], line["channel"]) == ("sent", "DEBUG", "webhook")
    assert line["topic"] == Topics(s.topic_prefix).deliveries("webhook")
    assert isinstance(line["partition"], int) and isinstance(line["offset"], int)
    assert outcomes[str(failed["id"])]["outcome"] == "dlq"
    assert "(permanent)" in outcomes[str(failed["id"])]["message"]


def test_receiver_and_uvicorn_lines_are_json_too(settings: Settings, backend: Backend) -> None:
    """uvicorn logs through the root handler (no log config of its own), in JSON like the rest;
    a refused request and an accepted one, each carrying the marker, leave no trace of it."""
    s = receiver_settings(settings)
    port = free_port()
    env = cli_env(
        settings,
        backend,
        HERALD_RECEIVER__PORT=str(port),
        HERALD_RECEIVER__SOURCES=json.dumps(SOURCES),
        HERALD_LOG_LEVEL="INFO",
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    seen: list[str] = []

    def read(stream: IO[str]) -> None:
        for text in stream:
            seen.append(text)

    with subprocess.Popen(
        [sys.executable, "-m", "herald.cli", "receiver"],
        cwd=ROOT,
        env={**base, **env},
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None
        reader = threading.Thread(target=read, args=(proc.stderr,), daemon=True)
        reader.start()
        try:
            client = Client(f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + 30
            while not any("Application startup complete" in x for x in seen):
                assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)
                time.sleep(0.05)
            body = json.dumps({"id": "evt-1", "type": "t", "title": MARKER, "user_id": "u"}).encode()
            assert client.post("/webhooks/sw", body, sign(s, "sw", body, "msg-1")).status == 202
            assert client.post("/webhooks/sw", body, {"webhook-id": MARKER}).status == 401
            client.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            reader.join(10)
    assert proc.returncode == 0, "".join(seen)
    lines = json_lines("".join(seen))
    assert_nothing_private("".join(seen), SW_SECRET)
    loggers = {x["logger"] for x in lines}
    assert "uvicorn.error" in loggers and "herald.processes" in loggers, loggers
    assert any("401" in x["message"] for x in lines)


def test_librdkafka_lines_come_out_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    """librdkafka logs through ``herald.kafka``: a producer that cannot connect says so, in JSON."""
    kafka_level = KAFKA_LOG.level
    KAFKA_LOG.setLevel(logging.NOTSET)  # `herald dlq` silences it in-process; not here
    with kept_logging():
        configure("INFO", "json")
        try:
            producer = Producer(
                {"bootstrap.servers": f"127.0.0.1:{free_port()}", "sasl.password": SECRET_VALUES[0]},
                logger=KAFKA_LOG,
            )
            deadline = time.monotonic() + 10
            err = ""
            while "herald.kafka" not in err and time.monotonic() < deadline:
                producer.poll(0.2)
                err += capsys.readouterr().err
            producer.flush(0)
        finally:
            KAFKA_LOG.setLevel(kafka_level)
    lines = json_lines(err)
    assert any(x["logger"] == "herald.kafka" for x in lines), err
    assert SECRET_VALUES[0] not in err
