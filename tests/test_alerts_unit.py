"""The alert rules: promtool accepts them and their unit tests pass; each has a summary and
a runbook line, is unit-tested, and names only metrics herald exports."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

from core import metrics

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
METRIC = re.compile(r"\b(herald_[a-z_]+)")
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make tools` installs Debian's prometheus package"
    return path


def alerts() -> list[dict[str, object]]:
    doc = yaml.safe_load((RULES / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def exported() -> set[str]:
    """Every family name herald defines: each metrics group, registered by calling it."""
    for value in vars(metrics).values():
        if isinstance(value, functools._lru_cache_wrapper):
            value()
    return {name for name in REGISTRY._names_to_collectors if name.startswith("herald_")}  # noqa: SLF001


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES / "alerts.yml")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_runs_the_rules_unit_tests() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", str(RULES / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_summary_a_runbook_and_a_unit_test() -> None:
    tested = (RULES / "alerts_test.yml").read_text()
    rules = alerts()
    assert len(rules) >= 10
    for rule in rules:
        name = rule["alert"]
        notes = rule.get("annotations") or {}
        assert isinstance(notes, dict) and notes.get("summary") and notes.get("runbook"), name
        assert f"alertname: {name}\n" in tested, f"{name} has no test in alerts_test.yml"


def test_alerts_name_only_metrics_herald_exports() -> None:
    names = exported()
    for rule in alerts():
        for used in METRIC.findall(str(rule["expr"])):
            family = used
            for suffix in SUFFIXES:
                family = family.removesuffix(suffix)
            why = f"{rule['alert']} uses {used}, which herald never exports"
            assert family in names or used in names, why
