"""The ingest process serves /metrics and /healthz with the counters the issue names."""

from __future__ import annotations

import urllib.request

import psycopg
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from herald.embedded import free_port
from herald.inspect import wait_committed
from tests.helpers import event, last_offsets, produce, start_ingest

pytestmark = pytest.mark.integration

OUTCOMES = ("inserted", "duplicate", "invalid", "rate_limited", "hidden")


def sample(outcome: str) -> float:
    return REGISTRY.get_sample_value("herald_ingest_events_total", {"outcome": outcome}) or 0.0


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "herald_ingest_events_total":
                out[s.labels["outcome"]] = s.value
            elif s.name == "herald_batch_seconds_count" and s.labels.get("consumer") == "ingest":
                out["batches"] = s.value
    return out


def test_metrics_and_health(settings: Settings, db: psycopg.Connection[tuple[object, ...]]) -> None:
    from storage.db import Database
    from storage.preferences import set_preferences

    prefs_db = Database(settings.database_url.get_secret_value())
    set_preferences(prefs_db, "hid", {"in_app": False})
    prefs_db.close()
    port = free_port()
    s = settings.model_copy(update={"metrics_port": port})
    before = {o: sample(o) for o in OUTCOMES}
    dup = event()
    positions = produce(s, [dup, dup, b"nope", event(user_id="hid")])
    runner = start_ingest(s)
    try:
        wait_committed(s, runner.group, last_offsets(positions))
        got = scrape(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        runner.stop()
    delta = {o: got[o] - before[o] for o in OUTCOMES}
    assert delta == {"inserted": 2, "duplicate": 1, "invalid": 1, "rate_limited": 0, "hidden": 1}
    assert got["batches"] >= 1
