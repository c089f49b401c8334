"""/healthz says why a process failed; a busy metrics port is a ConfigError naming the setting."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from core.errors import ConfigError
from core.http import Health, serve


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_returns_the_failure_reason_with_503() -> None:
    health = Health()
    server = serve("127.0.0.1", 0, health)
    try:
        assert get(server.server_port, "/healthz") == (200, "ok\n")
        health.fail("ingest: fatal broker error _AUTHENTICATION")
        health.beat()  # a late beat does not make a failed process healthy again
        assert get(server.server_port, "/healthz") == (
            503,
            "failed: ingest: fatal broker error _AUTHENTICATION\n",
        )
    finally:
        server.shutdown()
        server.server_close()


def test_a_stalled_loop_is_503() -> None:
    health = Health(stale_after=0.0)
    server = serve("127.0.0.1", 0, health)
    try:
        assert get(server.server_port, "/healthz") == (503, "stalled\n")
    finally:
        server.shutdown()
        server.server_close()


def test_busy_port_is_a_config_error_naming_the_setting(busy_port: int) -> None:
    with pytest.raises(ConfigError) as info:
        serve("127.0.0.1", busy_port, Health())
    assert str(info.value) == (
        f"metrics port {busy_port} on 127.0.0.1 is in use: "
        "set HERALD_METRICS_PORT to a free port, or 0 to pick one"
    )
