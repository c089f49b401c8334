"""The chaos report: printed for a person, written to ``chaos-report.json``, and repeated as
the last printed line (one JSON object) for scripts and the README's figures."""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from herald.chaos.check import STAGES, WARMUP_S, Result
from herald.chaos.faults import Fault
from herald.chaos.load import Load
from herald.chaos.watch import Watcher

RSS_TARGET_MB = 200.0
P99_TARGET_MS = 500.0
# A fault has drained when no waiting record is older than this (the steady state's own
# batching keeps the oldest waiting record well under it).
DRAINED_OLDEST_S = 2.0


def _drain(faults: Sequence[Fault], watcher: Watcher, load_end: float) -> None:
    """Each fault's peak lag (records waiting, from its start to its drain) and when the lag
    came back to its steady level after the fault was undone."""
    points = watcher.lag
    for i, f in enumerate(faults):
        if not f.started:
            continue
        after = [p for p in points if p.at >= f.recovered]
        calm = next((p for p in after if p.oldest_s <= DRAINED_OLDEST_S), None)
        f.drained = calm.at if calm is not None else 0.0
        until = f.drained or (faults[i + 1].started if i + 1 < len(faults) else load_end)
        window = [p.late for p in points if f.started <= p.at <= until]
        f.peak_lag = max(window, default=0)


def build(
    *,
    seed: int,
    duration_s: float,
    rate: float,
    users: int,
    load: Load,
    faults: Sequence[Fault],
    watcher: Watcher,
    result: Result,
    readers: dict[int, int],
    started: float,
    load_end: float,
    folder: str,
    interrupted: bool,
) -> dict[str, Any]:
    _drain(faults, watcher, load_end)
    rss = watcher.peak_rss_mb()
    failed = [i.name for i in result.invariants if not i.ok]
    accepted = result.counts["accepted"]
    return {
        "seed": seed,
        "duration_s": duration_s,
        "rate": rate,
        "users": users,
        "events": accepted,
        "records_sent": result.counts["records"],
        "achieved_rate": round(result.counts["records"] / max(load_end - started, 1e-9), 1),
        "faults": dict(Counter(f.kind for f in faults if f.started)),
        "fault_list": [
            {**f.as_json(), "started_s": round(f.started - started, 1) if f.started else None} for f in faults
        ],
        "invariants": [i.as_json() for i in result.invariants],
        "invariants_failed": len(failed),
        "failed": failed,
        "p99_critical_ms": result.latency.get("p99_ms"),
        "latency": result.latency,
        "peak_lag": max((p.late for p in watcher.lag), default=0),
        "peak_rss_mb": rss,
        "rss_under_target": all(v < RSS_TARGET_MB for v in rss.values()),
        "duplicates": result.duplicates,
        "metrics_vs_database": result.metrics,
        "counts": result.counts,
        "api_readers": {str(k): v for k, v in sorted(readers.items())},
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "folder": folder,
        "interrupted": interrupted,
    }


def fault_line(f: dict[str, Any]) -> str:
    what = f"{f['kind']:<9} {f['target']:<16} {f['detail']:<8} "
    if f["started_s"] is None:  # the run was interrupted before its time
        return f"    {'':>6}   {what}not run (the run stopped first)"
    drain = f"drained {f['drain_s']}s after" if f["drain_s"] is not None else "never drained"
    return f"    {f['started_s']:>6}s  {what}held {f['hold_s']}s, peak lag {f['peak_lag']:,}, {drain}" + (
        f"  ERROR {f['error']}" if f["error"] else ""
    )


def verdict(doc: dict[str, Any]) -> str:
    if doc.get("interrupted"):
        # Nothing drained: the end-state checks describe a pipeline stopped mid-flight.
        failed = f"; {', '.join(doc['failed'])} not (yet) holding" if doc["failed"] else ""
        return f"INTERRUPTED before the end, not drained{failed}"
    return "FAIL: " + ", ".join(doc["failed"]) if doc["invariants_failed"] else "PASS"


def emit(doc: dict[str, Any], path: str) -> None:
    lines = [
        "",
        f"chaos run, seed {doc['seed']}: {doc['records_sent']:,} records in {doc['duration_s']:g}s "
        f"({doc['achieved_rate']:,.0f}/s), {doc['events']:,} accepted",
        "  faults        " + ", ".join(f"{k} {v}" for k, v in doc["faults"].items()),
    ]
    lines += [fault_line(f) for f in doc["fault_list"]]
    lines.append("  invariants")
    for inv in doc["invariants"]:
        figures = {k: v for k, v in inv.items() if k not in ("name", "ok")}
        shown = json.dumps(figures, default=str)[:300]
        lines.append(f"    {'pass' if inv['ok'] else 'FAIL'}  {inv['name']:<26} {shown}")
    lat = doc["latency"]
    lines += [
        f"  criticals     p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms, p99 {lat['p99_ms']} ms "
        f"over {lat['criticals_outside_faults']:,} outside faults (target p99 < {P99_TARGET_MS:.0f} ms); "
        f"{lat['criticals_during_faults']:,} during faults, p99 {lat['during_faults_p99_ms']} ms; "
        f"{lat.get('criticals_warmup', 0):,} in the first {WARMUP_S:.0f} s of load, "
        f"max {lat.get('warmup_max_ms')} ms",
        "  where it goes "
        + "; ".join(
            f"{stage.replace('_to_', ' -> ')} p50 {lat[stage + '_p50_ms']} / p99 {lat[stage + '_p99_ms']} ms"
            for stage in STAGES
        ),
        "  slowest       "
        + ", ".join(f"{t['ms']} ms at {t['at_s']}s {t['marks_ms']}" for t in lat.get("slowest", [])[:5])
        + " (record to stored, published, sending, accepted)",
        f"  duplicates    {doc['duplicates']['total']} at the providers, by fault: "
        f"{doc['duplicates']['by_fault']}",
        f"  peak lag      {doc['peak_lag']:,} records",
        "  peak RSS      "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in doc["peak_rss_mb"].items())
        + f"  ({'all' if doc['rss_under_target'] else 'NOT all'} under {RSS_TARGET_MB:.0f} MB)",
        f"  logs          {doc['folder']}",
        f"  result        {verdict(doc)}; the report is in {path}",
    ]
    print("\n".join(lines), flush=True)
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(json.dumps(doc, separators=(",", ":"), default=str), flush=True)
