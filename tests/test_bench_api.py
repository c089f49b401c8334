"""`herald bench api` runs end to end at a tiny scale and reports its JSON line (no target asserted)."""

from __future__ import annotations

import pytest

from tests.conftest import Backend
from tests.helpers import herald_bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_api_reports_verified_figures(backend: Backend) -> None:
    result, _ = herald_bench(
        backend,
        *["api", "--users", "40", "--per-user", "15", "--seconds", "1", "--warmup", "0.5"],
        *["--connections", "4"],
        timeout=120,
    )
    assert {"requests_per_s", "p99_ms", "unread_count_p99_ms"} <= set(result)
    assert result["rows"] == 600 and result["verified"] is True
    assert result["requests_per_s"] > 0 and result["list_requests"] > 0
    assert 0 < result["unread_count_p99_ms"] and 0 < result["p99_ms"]
