"""`herald bench receiver` runs end to end on the test session's broker, with each load
generator, and reports its JSON line (briefly: this proves it works, not the target)."""

from __future__ import annotations

import pytest

from tests.conftest import Backend
from tests.helpers import herald_bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("loadgen, extra", [("python", ["--requests", "400"]), ("wrk", ["--duration", "1"])])
def test_bench_receiver_reports_verified_figures(backend: Backend, loadgen: str, extra: list[str]) -> None:
    result, _ = herald_bench(
        backend, "receiver", "--loadgen", loadgen, "--concurrency", "8", *extra, timeout=180
    )
    assert {"requests", "requests_per_s", "p50_ms", "p99_ms", "errors"} <= set(result)
    assert result["loadgen"] == loadgen
    assert result["errors"] == 0 and result["verified"] is True
    assert result["accepted"] == result["requests"] > 0
    if loadgen == "python":
        assert result["requests"] == 400 and result["records_on_topic"] == 400
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["requests_per_s"] == pytest.approx(result["requests"] / result["seconds"], rel=0.02)
