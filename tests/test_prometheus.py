"""A real Prometheus (Debian's server, on loopback) scrapes running herald processes and
evaluates herald's alert rules: the webhook deliverer stops while events keep arriving, the
lag rises and HeraldConsumerGroupStopped fires; the deliverer comes back, the alert clears
and the lag returns to 0. Everything is read through Prometheus' HTTP API.

The rules are herald's own file with every ``for:`` cut to a second, and the scrape and
evaluation intervals are a second: the alert logic is the shipped one, only faster.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from config.settings import Settings
from herald.dev import ALERT_RULES, Child, prometheus_config
from herald.embedded import free_port
from producers.topics import Topics, ensure_topics
from tests.conftest import Backend
from tests.helpers import produce
from tests.ops_support import cli_env, set_offsets
from tests.test_deliver import critical, deliver_settings, peer, user_with
from tests.webhook_peer import WebhookPeer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Conn = psycopg.Connection[tuple[object, ...]]
__all__ = ["peer"]  # the webhook peer fixture, used by name
ALERT = "HeraldConsumerGroupStopped"


class Prometheus:
    def __init__(self, folder: Path, scrape: list[tuple[str, int]]) -> None:
        server = shutil.which("prometheus")
        assert server, "prometheus is missing: `make tools` installs Debian's prometheus package"
        rules = folder / "alerts.yml"
        doc = yaml.safe_load(ALERT_RULES.read_text())
        for group in doc["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                rule["for"] = "1s"
        rules.write_text(yaml.safe_dump(doc, sort_keys=False))
        config = prometheus_config(scrape, rules).replace("5s", "1s")
        (folder / "prometheus.yml").write_text(config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    server,
                    f"--config.file={folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (loopback)
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> float | None:
        """The query's one value now; None when it has no sample."""
        result = self.get("/api/v1/query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None

    def alert_state(self, name: str, group: str) -> str | None:
        for alert in self.get("/api/v1/alerts")["alerts"]:
            if alert["labels"].get("alertname") == name and alert["labels"].get("group") == group:
                return str(alert["state"])
        return None

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                if check():
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.25)
        raise AssertionError(f"{what}: not seen in {timeout:.0f}s through Prometheus")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Trickle:
    """Critical events for one user, one every ``every_s``, until stopped: records keep arriving."""

    def __init__(self, settings: Settings, user: str, every_s: float = 0.3) -> None:
        self.sent = 0
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.wait(every_s):
                produce(settings, [critical(user, id=f"p-{uuid.uuid4().hex[:10]}")])
                self.sent += 1

        self._thread = threading.Thread(target=run, name="trickle", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def test_a_stopped_deliverer_fires_the_alert_in_prometheus_and_it_clears(
    db: Conn, backend: Backend, peer: WebhookPeer, tmp_path: Path
) -> None:
    s = deliver_settings(backend, session_timeout_ms=3000)
    topics = Topics(s.topic_prefix)
    ensure_topics(s, [*topics.ingest_topics(), *topics.channel_topics("webhook", s.delivery.retry_tiers)])
    user_with(db, s, "prom-user", peer.url("/ok"))
    ingest_group, deliver_group = (
        f"prom-ingest-{uuid.uuid4().hex[:6]}",
        f"prom-deliver-{uuid.uuid4().hex[:6]}",
    )
    # The deliverer's group owns every partition of its topic from the start, as a herald
    # group that has run does, so the exporter knows them before the first delivery.
    main = topics.deliveries("webhook")
    set_offsets(s, deliver_group, {(main, p): 0 for p in range(s.topic_partitions)})
    env = {
        **cli_env(s),
        "HERALD_SESSION_TIMEOUT_MS": str(s.session_timeout_ms),
        "HERALD_DELIVERY__RETRY_TIERS": json.dumps(list(s.delivery.retry_tiers)),
        "HERALD_WEBHOOK__ALLOW_PRIVATE_TARGETS": "true",
        "HERALD_APP_URL": "https://app.example.com/",
        "HERALD_LAG_EXPORTER__INTERVAL_S": "0.5",
        "HERALD_LAG_EXPORTER__GROUPS": json.dumps([deliver_group]),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    deliver_args = ["deliver", "--channel", "webhook", "--group", deliver_group]
    children = [
        Child("ingest-1", ["ingest", "--group", ingest_group], env, logs),
        Child("deliver-webhook", deliver_args, env, logs),
        Child("lag-exporter", ["lag-exporter"], env, logs),
    ]
    prom: Prometheus | None = None
    trickle: Trickle | None = None
    try:
        prom = Prometheus(tmp_path, [(c.name, c.metrics_port) for c in children])
        lag = f'sum(herald_consumer_lag_records{{group="{deliver_group}"}})'
        up = 'count(up{job=~"herald-.*"} == 1)'
        prom.wait(lambda: prom.value(up) == 3, "all three herald processes scraped and up")
        # Delivering: an event goes out, and the lag is 0.
        produce(s, [critical("prom-user", id="p-first")])
        peer.wait_for("/ok", 1, timeout=60)
        prom.wait(lambda: prom.value(lag) == 0, "lag 0 while delivering")
        assert prom.alert_state(ALERT, deliver_group) is None

        # The deliverer stops; events keep arriving.
        children[1].stop()
        trickle = Trickle(s, "prom-user")
        first: list[float] = []
        prom.wait(
            lambda: (prom.value(lag) or 0) >= 2 and not first.append(prom.value(lag) or 0), "lag rising"
        )
        prom.wait(lambda: (prom.value(lag) or 0) > first[0], "lag still rising")
        seconds = f'max(herald_consumer_lag_seconds{{group="{deliver_group}"}})'
        prom.wait(lambda: (prom.value(seconds) or 0) > 0, "lag in seconds above 0")
        prom.wait(lambda: prom.alert_state(ALERT, deliver_group) == "firing", f"{ALERT} firing")
        stopped = f'herald_consumer_group_status{{group="{deliver_group}",status="stopped"}}'
        assert prom.value(stopped) == 1

        # It comes back: the backlog drains, the alert clears, the lag returns to 0.
        trickle.stop()
        children[1] = Child("deliver-webhook", deliver_args, env, logs)
        prom.wait(lambda: prom.alert_state(ALERT, deliver_group) is None, f"{ALERT} cleared", timeout=90)
        prom.wait(lambda: prom.value(lag) == 0 and prom.value(seconds) == 0, "lag back to 0", timeout=90)
        assert prom.value(f'herald_consumer_group_status{{group="{deliver_group}",status="ok"}}') == 1
        peer.wait_for("/ok", 1 + trickle.sent, timeout=60)
    finally:
        if trickle is not None:
            trickle.stop()
        if prom is not None:
            prom.close()
        for child in reversed(children):
            child.stop()
