"""``herald receiver`` and ``herald produce`` as an operator runs them: one-line errors, SIGTERM,
files, headers, and signed POSTs to a running receiver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from config.settings import Settings
from herald.embedded import free_port
from herald.inspect import read_topic
from producers.topics import Topics
from tests.helpers import ROOT, herald_cli
from tests.receiver_helpers import SOURCES

pytestmark = pytest.mark.integration


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "HERALD_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "HERALD_DATABASE_URL": settings.database_url.get_secret_value(),
        "HERALD_TOPIC_PREFIX": settings.topic_prefix,
        "HERALD_METRICS_PORT": "-1",
        "HERALD_RECEIVER__SOURCES": json.dumps(SOURCES),
        **extra,
    }


def test_help_names_the_receiver_and_its_settings() -> None:
    out = herald_cli("--help", env={})
    assert out.returncode == 0 and "receiver" in out.stdout
    out = herald_cli("receiver", "--help", env={})
    assert out.returncode == 0 and "HERALD_RECEIVER__SOURCES" in out.stdout
    out = herald_cli("produce", "--help", env={})
    assert out.returncode == 0 and "--to-receiver" in out.stdout and "--file" in out.stdout


@pytest.mark.parametrize(
    "sources, message",
    [
        ('{"a": {"scheme": "none"}}', 'scheme "none" accepts unsigned requests'),
        ('{"a": {"scheme": "sha"}}', "unknown scheme 'sha'"),
        ('{"a": {"scheme": "github"}}', "needs at least one non-empty secret"),
    ],
)
def test_a_wrong_source_is_one_line(sources: str, message: str) -> None:
    out = herald_cli("receiver", env={"HERALD_RECEIVER__SOURCES": sources})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr


def test_a_busy_port_is_one_line_before_any_connection(busy_port: int) -> None:
    env = {"HERALD_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}", "HERALD_RECEIVER__PORT": str(busy_port)}
    out = herald_cli("receiver", env=env, timeout=30)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"herald: port {busy_port} on 127.0.0.1 is in use: "
        "set HERALD_RECEIVER__PORT to a free port, or 0 to pick one"
    ]


def test_an_unreachable_broker_is_one_line() -> None:
    env = {
        "HERALD_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "HERALD_RECEIVER__PORT": "0",
        "HERALD_RECEIVER__ACK_TIMEOUT_S": "1",
        "HERALD_METRICS_PORT": "-1",
        "HERALD_LOG_LEVEL": "CRITICAL",
    }
    out = herald_cli("receiver", env=env, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herald: cannot list topics at"), out.stderr


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except OSError:
        return False


def test_produce_posts_a_file_to_a_running_receiver_which_stops_on_sigterm(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    env = env_for(settings, HERALD_RECEIVER__PORT=str(port))
    base = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "herald.cli", "receiver"],
        cwd=ROOT,
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _healthy(url):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        lines = [json.dumps({"id": f"cli-{n}", "type": "t", "title": "x", "user_id": "u"}) for n in range(25)]
        (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
        for source in ("sw", "gh", "stripe"):
            out = herald_cli(
                "produce",
                "--to-receiver",
                url,
                "--source",
                source,
                "--file",
                str(tmp_path / "events.jsonl"),
                "--header",
                "X-GitHub-Event=push",
                env=env,
            )
            assert out.returncode == 0, out.stderr
            assert "25 accepted, 0 refused" in out.stdout
            assert "25/25" in out.stderr  # the progress bar's last state
        # A source the sender does not know is a one-line error.
        out = herald_cli("produce", "--to-receiver", url, "--source", "nope", "{}", env=env)
        assert out.returncode == 2 and "not in HERALD_RECEIVER__SOURCES" in out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    recs = read_topic(settings, Topics(settings.topic_prefix).events)
    assert len(recs) == 75
    by_source = {
        src: [r for r in recs if r.headers["herald-source"] == src.encode()] for src in ("sw", "gh", "stripe")
    }
    assert {k: len(v) for k, v in by_source.items()} == {"sw": 25, "gh": 25, "stripe": 25}
    assert {r.key for r in by_source["sw"]} == {f"sw:cli-{n}".encode() for n in range(25)}  # id from the line
    assert all(r.headers["X-GitHub-Event"] == b"push" for r in by_source["gh"])


def test_produce_a_file_with_headers_to_the_topic(settings: Settings, tmp_path: Path) -> None:
    lines = [json.dumps({"id": f"f-{n}", "type": "t", "title": "x", "user_id": "u"}) for n in range(7)]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n\n")
    env = env_for(settings)
    out = herald_cli(
        "produce", "--file", str(tmp_path / "events.jsonl"), "--header", "herald-source=backfill", env=env
    )
    assert out.returncode == 0, out.stderr
    assert "produced 7 record(s)" in out.stdout and "7/7" in out.stderr
    # Inline arguments still work, and stdin with --file -.
    assert herald_cli("produce", lines[0], env=env).returncode == 0
    assert herald_cli("produce", "--file", "-", env=env, stdin=lines[1] + "\n").returncode == 0
    recs = read_topic(settings, Topics(settings.topic_prefix).events)
    assert len(recs) == 9
    assert sum(1 for r in recs if r.headers.get("herald-source") == b"backfill") == 7
    out = herald_cli("produce", "--file", str(tmp_path / "missing.jsonl"), env=env)
    assert out.returncode == 2 and out.stderr.startswith("herald: cannot read")


def test_produce_to_an_unreachable_receiver_is_one_line() -> None:
    env = {"HERALD_RECEIVER__SOURCES": json.dumps(SOURCES)}
    out = herald_cli(
        "produce", "--to-receiver", f"http://127.0.0.1:{free_port()}", "--source", "gh", "{}", env=env
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the receiver" in lines[0], out.stderr
    out = herald_cli("produce", "--to-receiver", "http://x", "--source", "gh", "--key", "k", "{}", env=env)
    assert out.returncode == 2 and "--key do not go with --to-receiver" in out.stderr
