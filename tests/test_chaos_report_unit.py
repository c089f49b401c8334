"""The chaos report's printed form: an interrupted run reports what ran, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from herald.chaos.check import STAGES
from herald.chaos.report import emit


def fault(kind: str, started_s: float | None, **extra: Any) -> dict[str, Any]:
    ran = started_s is not None
    return {
        "kind": kind,
        "target": "ingest-1" if kind == "kill" else "postgres",
        "detail": "",
        "at_s": 49.0,
        "hold_s": 5.5,
        "started": 1.0 if ran else None,
        "ended": 6.5 if ran else None,
        "recovered_s": 2.0 if ran else None,
        "drain_s": 30.88 if ran else None,
        "peak_lag": 32_216 if ran else 0,
        "error": None,
        "started_s": started_s,
        **extra,
    }


def report(**changes: Any) -> dict[str, Any]:
    latency: dict[str, Any] = {
        "p50_ms": 90.0,
        "p95_ms": 150.0,
        "p99_ms": 187.0,
        "criticals_outside_faults": 2179,
        "criticals_during_faults": 10,
        "during_faults_p99_ms": 5000.0,
        "criticals_warmup": 200,
        "warmup_max_ms": 1182.3,
        "slowest": [],
    }
    for stage in STAGES:
        latency[f"{stage}_p50_ms"] = 1.0
        latency[f"{stage}_p99_ms"] = 2.0
    doc = {
        "seed": 7502,
        "records_sent": 91_964,
        "duration_s": 300.0,
        "achieved_rate": 1999.2,
        "events": 91_964,
        "faults": {"postgres": 1, "kill": 1},
        "fault_list": [fault("postgres", 49.0), fault("kill", None)],
        "invariants": [{"name": "events_exactly_once", "ok": True, "missing": 0}],
        "invariants_failed": 0,
        "failed": [],
        "latency": latency,
        "duplicates": {"total": 0, "by_fault": {}},
        "peak_lag": 32_216,
        "peak_rss_mb": {"ingest-1": 150.0},
        "rss_under_target": True,
        "folder": "/tmp/x",
        "interrupted": False,
    }
    return {**doc, **changes}


def test_a_fault_the_run_never_reached_is_reported_as_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = report(interrupted=True)
    emit(doc, str(tmp_path / "r.json"))
    out = capsys.readouterr().out.splitlines()
    assert any("49.0s  postgres" in line and "drained 30.88s after" in line for line in out)
    assert any("kill" in line and "not run (the run stopped first)" in line for line in out)
    # An interrupted run is not a pass, even with no invariant failed (its exit status is 1).
    assert any(line.startswith("  result        INTERRUPTED before the end, not drained;") for line in out)
    emit(report(interrupted=True, invariants_failed=1, failed=["lag_zero"]), str(tmp_path / "s.json"))
    assert "INTERRUPTED before the end, not drained; lag_zero not (yet) holding" in capsys.readouterr().out
    assert json.loads(out[-1]) == json.loads((tmp_path / "r.json").read_text())


def test_a_finished_run_passes_or_names_what_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emit(report(fault_list=[fault("postgres", 49.0)]), str(tmp_path / "a.json"))
    assert "  result        PASS; the report is in" in capsys.readouterr().out
    emit(report(invariants_failed=1, failed=["lag_zero"]), str(tmp_path / "b.json"))
    assert "  result        FAIL: lag_zero;" in capsys.readouterr().out
