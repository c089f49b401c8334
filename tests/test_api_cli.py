"""``herald api`` and ``herald token`` as an operator runs them: one-line errors, clean SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from herald.embedded import free_port
from tests.api_support import AUDIENCE, JWT_SECRET
from tests.helpers import ROOT, herald_cli

if TYPE_CHECKING:
    from tests.conftest import Backend

pytestmark = pytest.mark.integration


def api_env(backend: Backend, port: int, **extra: str) -> dict[str, str]:
    return {
        "HERALD_DATABASE_URL": backend.database_url,
        "HERALD_API__JWT_SECRET": JWT_SECRET,
        "HERALD_API__AUDIENCE": AUDIENCE,
        "HERALD_API__PORT": str(port),
        "HERALD_METRICS_PORT": "-1",
        **extra,
    }


def one_line_error(out: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("herald: ") and says in lines[0], out.stderr


def test_no_jwt_key_refuses_to_start(backend: Backend) -> None:
    env = api_env(backend, free_port())
    del env["HERALD_API__JWT_SECRET"]
    one_line_error(herald_cli("api", env=env), 2, "HERALD_API__JWT_SECRET")


def test_a_busy_port_is_one_line(backend: Backend, busy_port: int) -> None:
    one_line_error(herald_cli("api", env=api_env(backend, busy_port)), 2, "HERALD_API__PORT")


def test_an_unreachable_database_is_one_line(backend: Backend) -> None:
    env = api_env(backend, free_port(), HERALD_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    one_line_error(herald_cli("api", env=env), 1, "cannot connect to PostgreSQL")


def test_a_short_secret_is_an_invalid_setting(backend: Backend) -> None:
    env = api_env(backend, free_port(), HERALD_API__JWT_SECRET="short")
    one_line_error(herald_cli("api", env=env), 2, "api.jwt_secret")


def test_token_then_serve_then_sigterm(backend: Backend) -> None:
    port = free_port()
    env = api_env(backend, port)
    minted = herald_cli("token", "cli-user", "--ttl", "60", env=env)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    base = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "herald.cli", "api"],
        cwd=ROOT,
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "herald api did not answer in 30 s"
            time.sleep(0.1)
        r = httpx.get(f"{url}/v1/notifications/unread-count", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json() == {"count": 0}
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert token not in err  # never log tokens
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_token_without_a_secret_is_one_line(backend: Backend) -> None:
    one_line_error(herald_cli("token", "u", env={}), 2, "HERALD_API__JWT_SECRET")


def test_help_names_the_api_and_token(backend: Backend) -> None:
    out = herald_cli("api", "--help", env={})
    assert out.returncode == 0 and "HERALD_API__JWT_PUBLIC_KEY" in out.stdout
