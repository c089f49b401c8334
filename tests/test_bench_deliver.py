"""`herald bench deliver` runs end to end on the test session's broker and database, and
reports its JSON line (briefly: this proves it works and verifies, not the target)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import Backend

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def bench_deliver(backend: Backend, *args: str) -> tuple[dict[str, Any], str]:
    """``herald bench deliver ARGS`` on the session's backends: its JSON line and its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env |= {"HERALD_KAFKA_BOOTSTRAP": backend.bootstrap, "HERALD_DATABASE_URL": backend.database_url}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "herald.cli",
            "bench",
            "deliver",
            "--deliveries",
            "600",
            "--users",
            "50",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stdout


def test_bench_deliver_reports_verified_figures(backend: Backend) -> None:
    result, stdout = bench_deliver(backend, "--latency-ms", "20", "--concurrency", "32")
    assert {"deliveries", "deliveries_per_s", "p50_ms", "p99_ms", "duplicates"} <= set(result)
    assert result["deliveries"] == 600 and result["duplicates"] == 0
    assert result["concurrency"] == 32 and result["receiver_latency_ms"] == 20
    assert 20 <= result["p50_ms"] <= result["p99_ms"], "no delivery can beat the receiver's 20 ms"
    assert result["deliveries_per_s"] == pytest.approx(600 / result["seconds"], rel=0.01)
    assert "verify: 600 rows sent, 600 delivery ids answered, 0 duplicates, 0 bad signatures: ok" in stdout


def test_bench_deliver_email_counts_each_message_id_once(backend: Backend) -> None:
    result, stdout = bench_deliver(backend, "--channel", "email", "--concurrency", "32")
    assert {"deliveries", "deliveries_per_s", "p99_ms", "duplicates"} <= set(result)
    assert result["channel"] == "email" and result["deliveries"] == 600 and result["duplicates"] == 0
    assert result["receiver_latency_ms"] == 5 and 5 <= result["p50_ms"] <= result["p99_ms"]
    assert (
        "verify: 600 rows sent, 600 delivery ids answered, 0 duplicates, 0 without a Message-ID: ok" in stdout
    )
