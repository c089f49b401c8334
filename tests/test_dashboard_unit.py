"""The Grafana dashboard: every panel queries the provisioned Prometheus, every query names
only metrics herald exports and is valid PromQL (promtool parses it as a recording rule),
the panels cover what operators watch, and the provisioning file points where compose
mounts the dashboards."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.test_alerts_unit import METRIC, SUFFIXES, exported, promtool

GRAFANA = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "herald.json"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "herald.yml"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
# Where docker-compose.yml mounts deploy/grafana/dashboards (read-only).
MOUNTED_AT = "/var/lib/grafana/dashboards"

# Grafana's own range variables become a duration; dashboard variables a match-all regex
# (every use is inside `label=~"..."`).
DURATIONS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}")

# The list: throughput, lag in records and seconds, DLQ by reason, delivery outcomes by
# channel, end-to-end latency, circuit state, digest windows.
REQUIRED = {
    "herald_records_consumed",
    "herald_records_processed",
    "herald_ingest_events",
    "herald_consumer_lag_records",
    "herald_consumer_lag_seconds",
    "herald_consumer_group_status",
    "herald_dlq_records",
    "herald_deliver_outcomes",
    "herald_deliver_responses",
    "herald_delivery_latency_seconds",
    "herald_deliver_circuits",
    "herald_digest_open_windows",
    "herald_digests",
    "herald_digest_close_lag_seconds",
    "herald_receiver_requests",
    "herald_api_requests",
}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels() -> Iterator[dict[str, Any]]:
    """Every panel that draws something: rows are headings (a collapsed row holds its panels)."""
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            assert not panel.get("targets"), f"row {panel['title']!r} has queries"
            yield from panel.get("panels", [])
        else:
            yield panel


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [(f"{p['title']} {t['refId']}", t["expr"]) for p in panels() for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append((f"variable {var['name']}", query))
    return found


def family(name: str) -> str:
    for suffix in SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def families() -> set[str]:
    return {family(used) for _, expr in queries() for used in METRIC.findall(expr)}


def substituted(expr: str) -> str:
    return VARIABLE.sub(".*", DURATIONS.sub("5m", expr))


def test_the_dashboard_has_a_stable_identity() -> None:
    doc = dashboard()
    assert doc["uid"] == "herald"
    assert doc["title"] == "herald"
    assert doc["schemaVersion"] == 39
    assert doc.get("id") is None, "an exported id would clash with Grafana's own"


def test_every_panel_queries_prometheus_and_says_what_it_means() -> None:
    seen = [p["id"] for p in dashboard()["panels"]] + [
        p["id"] for row in dashboard()["panels"] for p in row.get("panels", [])
    ]
    assert len(seen) == len(set(seen)), "panel ids repeat"
    titles = [p["title"] for p in panels()]
    assert len(titles) == len(set(titles)), "panel titles repeat"
    for panel in panels():
        title = panel["title"]
        assert panel["type"] in {"timeseries", "stat"}, title
        assert panel.get("datasource") == DATASOURCE, title
        assert str(panel.get("description", "")).strip(), f"{title} has no description"
        targets = panel.get("targets") or []
        assert targets, f"{title} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), title
        for target in targets:
            assert target.get("datasource") == DATASOURCE, title
            assert str(target.get("expr", "")).strip(), title
    for var in dashboard()["templating"]["list"]:
        assert var.get("datasource") == DATASOURCE, var["name"]


def test_queries_name_only_metrics_herald_exports() -> None:
    names = exported()
    for where, expr in queries():
        for used in METRIC.findall(expr):
            assert family(used) in names or used in names, f"{where} uses {used}, which herald never exports"


def test_the_panels_cover_what_operators_watch() -> None:
    missing = REQUIRED - families()
    assert not missing, f"no panel shows {sorted(missing)}"


def test_every_variable_used_is_defined() -> None:
    defined = {var["name"] for var in dashboard()["templating"]["list"]}
    for where, expr in queries():
        for match in VARIABLE.finditer(DURATIONS.sub("", expr)):
            name = match.group(1) or match.group(2)
            assert name in defined, f"{where} uses ${name}, which the dashboard does not define"


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substituted(expr)}
        for i, (where, expr) in enumerate(queries())
        if not where.startswith("variable ")  # label_values() is Grafana's, not PromQL
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout, done.stdout


def test_grafana_provisions_the_dashboard_from_the_mounted_folder() -> None:
    doc = yaml.safe_load(PROVIDER.read_text())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == MOUNTED_AT
    assert provider.get("folder") or provider["options"].get("foldersFromFilesStructure")
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert DATASOURCE["uid"] in {ds["uid"] for ds in datasources["datasources"]}
