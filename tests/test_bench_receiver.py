"""`herald bench receiver` runs end to end on the test session's broker, with each load
generator, and reports its JSON line (briefly: this proves it works, not the target)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import Backend

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("loadgen, extra", [("python", ["--requests", "400"]), ("wrk", ["--duration", "1"])])
def test_bench_receiver_reports_verified_figures(backend: Backend, loadgen: str, extra: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env |= {"HERALD_KAFKA_BOOTSTRAP": backend.bootstrap, "HERALD_DATABASE_URL": backend.database_url}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "herald.cli",
            "bench",
            "receiver",
            "--loadgen",
            loadgen,
            "--concurrency",
            "8",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"requests", "requests_per_s", "p50_ms", "p99_ms", "errors"} <= set(result)
    assert result["loadgen"] == loadgen
    assert result["errors"] == 0 and result["verified"] is True
    assert result["accepted"] == result["requests"] > 0
    if loadgen == "python":
        assert result["requests"] == 400 and result["records_on_topic"] == 400
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["requests_per_s"] == pytest.approx(result["requests"] / result["seconds"], rel=0.02)
