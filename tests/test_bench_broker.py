"""`herald bench broker` runs against the test broker and reports the broker's CPU per interval."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import Backend

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_broker_reports_the_broker_cpu_per_interval(backend: Backend) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env |= {"HERALD_KAFKA_BOOTSTRAP": backend.bootstrap, "HERALD_SESSION_TIMEOUT_MS": "2000"}
    run = subprocess.run(
        [sys.executable, "-m", "herald.cli", "bench", "broker"]
        + ["--rate", "500", "--seconds", "3", "--groups", "2", "--interval", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["records"] == 1500 and result["groups"] == 2 and result["verified"] is True
    intervals = result["intervals"]
    assert [i["records"] for i in intervals] == sorted(i["records"] for i in intervals)
    assert intervals[-1]["records"] == 1500 and 2 <= len(intervals) <= 3  # a line a second, and the end
    # The test broker runs on this machine: its CPU is measured (a busy broker shows > 0).
    assert all(i["broker_cores"] is not None and i["broker_cores"] >= 0 for i in intervals)
    assert sum(i["broker_cores"] for i in intervals) > 0
    assert result["broker_cores_last"] == intervals[-1]["broker_cores"]


def test_bench_broker_refuses_a_wrong_argument() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "herald.cli", "bench", "broker", "--groups", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("herald: ")
    assert "Traceback" not in run.stderr
