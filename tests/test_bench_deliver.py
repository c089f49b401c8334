"""`herald bench deliver` runs end to end on the test session's broker and database, and
reports its JSON line (briefly: this proves it works and verifies, not the target)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Backend
from tests.helpers import herald_bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def bench_deliver(backend: Backend, *args: str) -> tuple[dict[str, Any], str]:
    """``herald bench deliver ARGS`` on the session's backends: its JSON line and its output."""
    return herald_bench(backend, "deliver", "--deliveries", "600", "--users", "50", *args, timeout=240)


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
