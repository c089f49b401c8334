"""`herald bench broker` runs against the test broker and reports the broker's CPU per interval."""

from __future__ import annotations

import pytest

from tests.conftest import Backend
from tests.helpers import herald_bench, herald_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_broker_reports_the_broker_cpu_per_interval(backend: Backend) -> None:
    result, _ = herald_bench(
        backend,
        *["broker", "--rate", "500", "--seconds", "3", "--groups", "2", "--interval", "1"],
        timeout=120,
        database=False,
        HERALD_SESSION_TIMEOUT_MS="2000",
    )
    assert result["records"] == 1500 and result["groups"] == 2 and result["verified"] is True
    intervals = result["intervals"]
    assert [i["records"] for i in intervals] == sorted(i["records"] for i in intervals)
    assert intervals[-1]["records"] == 1500 and 2 <= len(intervals) <= 3  # a line a second, and the end
    # The test broker runs on this machine: its CPU is measured (a busy broker shows > 0).
    assert all(i["broker_cores"] is not None and i["broker_cores"] >= 0 for i in intervals)
    assert sum(i["broker_cores"] for i in intervals) > 0
    assert result["broker_cores_last"] == intervals[-1]["broker_cores"]


def test_bench_broker_refuses_a_wrong_argument() -> None:
    run = herald_cli("bench", "broker", "--groups", "0", env={})
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("herald: ")
    assert "Traceback" not in run.stderr
