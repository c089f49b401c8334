"""The metrics port: busy is a one-line error before any broker connection; port 0 lets two
``herald ingest`` processes share a host."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from config.settings import Settings
from herald.embedded import free_port
from tests.helpers import ROOT, herald_cli

pytestmark = pytest.mark.integration


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "HERALD_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "HERALD_DATABASE_URL": settings.database_url.get_secret_value(),
        "HERALD_TOPIC_PREFIX": settings.topic_prefix,
        "HERALD_METRICS_HOST": "127.0.0.1",
        **extra,
    }


def test_busy_metrics_port_is_one_line_before_any_connection(busy_port: int) -> None:
    # No broker listens here: reaching it first would hang or print librdkafka errors.
    env = {
        "HERALD_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "HERALD_METRICS_HOST": "127.0.0.1",
        "HERALD_METRICS_PORT": str(busy_port),
    }
    proc = herald_cli("ingest", "--timeout", "5", env=env, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"herald: metrics port {busy_port} on 127.0.0.1 is in use: "
        "set HERALD_METRICS_PORT to a free port, or 0 to pick one"
    ]


def test_two_ingest_processes_on_one_host_with_port_zero(settings: Settings) -> None:
    """HERALD_METRICS_PORT=0 picks a free port each, so both start and run."""
    env = cli_env(settings, HERALD_METRICS_PORT="0")
    base = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "herald.cli", "ingest", "--timeout", "4"],
            cwd=ROOT,
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr
        assert "serving /metrics and /healthz on http://127.0.0.1:" in stderr
        assert "Traceback" not in stderr
    ports = {
        line.rsplit(":", 1)[1]
        for _, err in results
        for line in err.splitlines()
        if "serving /metrics" in line
    }
    assert len(ports) == 2, ports
