"""`herald bench api` runs end to end at a tiny scale and reports its JSON line (no target asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import Backend

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_api_reports_verified_figures(backend: Backend) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env |= {"HERALD_KAFKA_BOOTSTRAP": backend.bootstrap, "HERALD_DATABASE_URL": backend.database_url}
    run = subprocess.run(
        [sys.executable, "-m", "herald.cli", "bench", "api"]
        + ["--users", "40", "--per-user", "15", "--seconds", "1", "--warmup", "0.5", "--connections", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"requests_per_s", "p99_ms", "unread_count_p99_ms"} <= set(result)
    assert result["rows"] == 600 and result["verified"] is True
    assert result["requests_per_s"] > 0 and result["list_requests"] > 0
    assert 0 < result["unread_count_p99_ms"] and 0 < result["p99_ms"]
