"""`herald bench ingest` runs end to end on an existing stack and reports its JSON line."""

from __future__ import annotations

import pytest

from tests.conftest import Backend
from tests.helpers import herald_bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize(("processes", "rate"), [(1, None), (2, None), (1, 1000)])
def test_bench_reports_verified_figures(backend: Backend, processes: int, rate: int | None) -> None:
    result, _ = herald_bench(
        backend,
        *["ingest", "--events", "3000", "--users", "300", "--processes", str(processes)],
        *(["--rate", str(rate)] if rate else []),
        timeout=240,
        HERALD_SESSION_TIMEOUT_MS="2000",
    )
    assert {
        "events",
        "duplicates",
        "events_per_s",
        "limit_events_per_s",
        "limit_ratio",
        "baseline_events_per_s",
        "ratio",
        "cpu_us_per_event",
    } <= set(result)
    assert result["events"] == 3000
    assert result["duplicates"] == 300
    assert result["verified"] is True
    assert result["processes"] == processes
    assert result["postgres"]["fsync"] == "on" and result["postgres"]["synchronous_commit"] == "on"
    assert result["ratio"] == pytest.approx(
        result["events_per_s"] / result["baseline_events_per_s"], rel=0.01
    )
    assert result["limit_ratio"] == pytest.approx(
        result["events_per_s"] / result["limit_events_per_s"], rel=0.01
    )
    # The embedded stack runs here: PostgreSQL's and the broker's CPU are measured, not guessed.
    cpu = result["cpu_us_per_event"]
    assert cpu["herald"] > 0 and cpu["postgres"] > 0 and cpu["broker"] is not None
    if rate:
        assert result["rate"] == rate
        # Every record waits at least for its batch's transaction; none waits forever.
        assert 0 < result["p50_ms"] <= result["p99_ms"] < 10_000
    else:
        assert "p99_ms" not in result
