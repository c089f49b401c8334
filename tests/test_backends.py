"""The embedded backend is the default; overrides and containers are opt-in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Backend, backend_choice

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_is_the_default() -> None:
    assert backend_choice({}) == {"kafka": "embedded", "postgres": "embedded"}


def test_overrides_are_per_part() -> None:
    assert backend_choice({"HERALD_TEST_KAFKA": "k:9092"}) == {"kafka": "override", "postgres": "embedded"}
    assert backend_choice({"HERALD_TEST_DATABASE_URL": "postgresql://x"})["postgres"] == "override"


def test_containers_only_when_asked() -> None:
    assert backend_choice({"HERALD_TEST_BACKEND": "containers"})["kafka"] == "containers"
    assert backend_choice({"HERALD_TEST_BACKEND": "embedded"})["kafka"] == "embedded"


def test_containers_backend_is_wired() -> None:
    """The testcontainers modules the containers backend uses are installed and importable."""
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.postgres import PostgresContainer

    assert callable(KafkaContainer.get_bootstrap_server)
    assert callable(PostgresContainer.get_connection_url)


@pytest.mark.integration
def test_overrides_point_the_suite_at_an_existing_stack(backend: Backend) -> None:
    """A nested pytest run with both overrides uses our stack instead of starting its own."""
    env = {
        **os.environ,
        "HERALD_TEST_KAFKA": backend.bootstrap,
        "HERALD_TEST_DATABASE_URL": backend.database_url,
    }
    env.pop("HERALD_TEST_BACKEND", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "tests/test_dedupe.py::test_same_event_twice_in_one_batch",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "herald backends: kafka=override postgres=override" in proc.stdout
    assert "1 passed" in proc.stdout
