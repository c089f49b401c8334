"""`herald bench digest` runs end to end on an existing stack and reports its JSON line."""

from __future__ import annotations

import pytest

from tests.conftest import Backend
from tests.helpers import herald_bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_digest_reports_verified_figures(backend: Backend) -> None:
    result, _ = herald_bench(
        backend,
        *["digest", "--items", "2000", "--users", "40", "--window-s", "2", "--grace-s", "0.5"],
        timeout=180,
        HERALD_SESSION_TIMEOUT_MS="2000",
    )
    assert {"items", "items_per_s", "digests", "close_lag_p99_s"} <= set(result)
    assert result["items"] == 2000 and result["digests"] == 40
    assert result["verified"] is True
    assert result["items_per_s"] > 0 and 0 <= result["close_lag_p99_s"] < 30
    assert result["items_per_s"] == pytest.approx(result["items"] / result["seconds"], rel=0.01)
    assert result["postgres"]["fsync"] == "on" and result["postgres"]["synchronous_commit"] == "on"
