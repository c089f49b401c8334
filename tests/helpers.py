"""Factories and runners shared by the integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from config.settings import Settings
from consumers.loop import Stopper
from herald.inspect import wait_committed
from herald.processes import IngestRun, run_ingest
from producers.publisher import KafkaPublisher, OutRecord, Position
from producers.topics import Topics, ensure_topics

if TYPE_CHECKING:
    from tests.conftest import Backend

R = TypeVar("R")

ROOT = Path(__file__).resolve().parents[1]


def herald_cli(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``herald ARGS`` as an operator would, with only the given HERALD_* settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "herald.cli", *args],
        cwd=ROOT,
        env=base,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def herald_bench(
    backend: Backend, *args: str, timeout: float, database: bool = True, **settings: str
) -> tuple[dict[str, Any], str]:
    """Run ``herald bench ARGS`` on the session's broker (and database): its last line, the
    JSON result, and its whole output. SETTINGS are more HERALD_* variables."""
    env = {"HERALD_KAFKA_BOOTSTRAP": backend.bootstrap, **settings}
    if database:
        env["HERALD_DATABASE_URL"] = backend.database_url
    run = herald_cli("bench", *args, env=env, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stdout


def expected_key(ev: dict[str, Any], default_source: str = "events") -> str:
    """The idempotency key the README's tier table gives an event, written out independently
    of ``core.envelope`` so that tests check the code against the documented contract."""
    if "idempotency_key" in ev:
        return f"k:{ev['idempotency_key']}"
    if "resource_id" in ev:
        return f"r:{len(ev['type'])}:{ev['type']}:{ev['resource_id']}"
    source = ev.get("source") or default_source
    return f"s:{len(source)}:{source}:{ev['id']}"


def make_settings(bootstrap: str, database_url: str, **overrides: Any) -> Settings:
    """Fresh topic prefix; short timers so the suite stays fast."""
    values: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        "database_url": database_url,
        "topic_prefix": f"t{uuid.uuid4().hex[:10]}",
        "topic_partitions": 2,
        "session_timeout_ms": 2000,
        "batch_time_ms": 100,
        "metrics_port": -1,
        "db_backoff_min_ms": 100,
        "db_backoff_max_ms": 1000,
    }
    values.update(overrides)
    return Settings(**values)


def event(**fields: Any) -> dict[str, Any]:
    """A valid native envelope; fields override the defaults."""
    base: dict[str, Any] = {
        "id": f"evt-{uuid.uuid4().hex[:12]}",
        "type": "invoice.payment_failed",
        "title": "Payment failed",
        "user_id": "user-1",
        "severity": "info",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def produce(
    settings: Settings,
    values: Iterable[dict[str, Any] | bytes],
    *,
    key: bytes | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> list[Position]:
    """Produce to <prefix>.events (created if missing); returns where the records landed (in ack order)."""
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.ingest_topics())
    recs = [
        OutRecord(
            topic=topics.events,
            value=v if isinstance(v, bytes) else json.dumps(v).encode(),
            key=key,
            headers=list(headers or []),
        )
        for v in values
    ]
    pub = KafkaPublisher(settings)
    try:
        return pub.publish(recs)
    finally:
        pub.close()


def last_offsets(positions: Sequence[Position]) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for topic, partition, offset in positions:
        out[(topic, partition)] = max(offset, out.get((topic, partition), -1))
    return out


@dataclass
class RunThread(Generic[R]):
    """An in-process herald process (ingest, deliver, digest) on a thread, stopped like SIGTERM would."""

    name: str
    group: str
    stopper: Stopper
    thread: threading.Thread
    result: list[R]

    def stop(self, timeout: float = 30.0) -> R:
        self.stopper.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.name} did not stop"
        assert self.result, f"{self.name} crashed (see the log)"
        return self.result[0]


def start_thread(name: str, group: str, run: Callable[[str, Stopper], R]) -> RunThread[R]:
    """Run ``run(group, stopper)`` on a thread named ``name``."""
    stopper = Stopper()
    result: list[R] = []

    def target() -> None:
        result.append(run(group, stopper))

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    return RunThread(name, group, stopper, t, result)


IngestThread = RunThread[IngestRun]


def start_ingest(settings: Settings, group: str | None = None) -> IngestThread:
    return start_thread(
        "ingest",
        group or f"g-{uuid.uuid4().hex[:8]}",
        lambda g, st: run_ingest(settings, group=g, stopper=st),
    )


def ingest(
    settings: Settings, positions: Sequence[Position], group: str | None = None, timeout: float = 60.0
) -> IngestRun:
    """Run ingest until the group has committed past every produced record."""
    runner = start_ingest(settings, group)
    try:
        wait_committed(settings, runner.group, last_offsets(positions), timeout=timeout)
    finally:
        run = runner.stop()
    return run
