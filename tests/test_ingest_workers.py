"""``herald ingest --workers N``: N consumers of one group under one supervisor, one
/metrics with a worker label, one /healthz, a clean SIGTERM, and no orphan when a worker dies."""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

import psutil
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from herald.embedded import free_port
from herald.inspect import committed
from tests.faults import HeraldProcess
from tests.helpers import event, herald_cli, last_offsets, produce
from tests.test_deliver import wait_until

pytestmark = pytest.mark.integration


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:  # noqa: S310
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _inserted_by_worker(port: int) -> dict[str, float]:
    _, text = _get(port, "/metrics")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "herald_ingest_events_total" and s.labels.get("outcome") == "inserted":
                out[s.labels["worker"]] = out.get(s.labels["worker"], 0.0) + s.value
    return out


def _start_supervisor(
    settings: Settings, tmp_path: Path, port: int
) -> tuple[HeraldProcess, list[psutil.Process]]:
    """``herald ingest --workers 2`` on 4 partitions, started; returns it and its two workers."""
    sup = HeraldProcess(
        settings,
        f"{settings.topic_prefix}-workers",
        tmp_path,
        command=("ingest", "--workers", "2"),
        HERALD_METRICS_PORT=str(port),
        HERALD_METRICS_HOST="127.0.0.1",
        HERALD_TOPIC_PARTITIONS="4",
    )
    sup.start()
    assert sup.proc is not None
    pid = sup.proc.pid
    wait_until(lambda: len(psutil.Process(pid).children()) == 2, 30, "two worker processes")
    return sup, psutil.Process(pid).children()


def test_two_workers_share_the_group_behind_one_endpoint(
    settings: Settings, db: psycopg.Connection[tuple[object, ...]], tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"topic_partitions": 4})
    port = free_port()
    sup, _ = _start_supervisor(settings, tmp_path, port)
    try:
        assert sup.proc is not None
        # Every record keyed by its user: the four partitions all get some.
        events = [event(user_id=f"w-user-{i % 40}") for i in range(400)]
        positions = []
        for i in range(0, 400, 40):
            positions += produce(settings, events[i : i + 40], key=f"k{i}".encode())
        wait_until(
            lambda: db.execute("SELECT count(*) FROM notifications").fetchone() == (400,),
            90,
            "400 notifications",
        )
        # One scrape, both workers' series, told apart by the worker label; together they
        # inserted every notification exactly once.
        wait_until(lambda: sum(_inserted_by_worker(port).values()) == 400, 30, "the metrics to add up")
        by_worker = _inserted_by_worker(port)
        assert set(by_worker) == {"0", "1"} and all(v > 0 for v in by_worker.values()), by_worker
        assert _get(port, "/healthz") == (200, "ok\n")

        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(90) == 0, sup.log_text()[-3000:]
        # Both workers committed their partitions to the end before they left.
        ends = last_offsets(positions)
        got = committed(settings, sup.group, list(ends))
        assert all(got[tp] == off + 1 for tp, off in ends.items()), (got, ends)
    finally:
        _kill_tree(sup)


def test_a_dead_worker_stops_the_supervisor_and_its_sibling(settings: Settings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"topic_partitions": 4})
    port = free_port()
    sup, (first, second) = _start_supervisor(settings, tmp_path, port)
    try:
        assert sup.proc is not None
        wait_until(lambda: _get(port, "/healthz")[0] == 200, 30, "health")
        os.kill(first.pid, signal.SIGKILL)
        assert sup.proc.wait(90) == 1
        assert "worker 0" in sup.log_text() or "worker 1" in sup.log_text()
        assert "exited with -9" in sup.log_text()
        second.wait(5)  # stopped by the supervisor, not left behind
        assert not second.is_running()
    finally:
        _kill_tree(sup)


def test_a_killed_supervisor_leaves_no_worker_behind(settings: Settings, tmp_path: Path) -> None:
    sup, workers = _start_supervisor(settings, tmp_path, free_port())
    try:
        # The supervisor's and both workers' metrics servers: each worker handles SIGTERM by now.
        assert sup.wait_count("serving /metrics", 3, 30), sup.log_text()[-3000:]
        sup.kill()
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, "workers outlived their supervisor"
        # Stopped by SIGTERM (each finishing its batch and leaving the group), not killed.
        assert "received SIGTERM" in sup.log_text()
        assert sup.log_text().count("ingest stopped:") == 2, sup.log_text()[-3000:]
    finally:
        _kill_tree(sup)


def _kill_tree(sup: HeraldProcess) -> None:
    if sup.proc is not None and sup.alive():
        for child in psutil.Process(sup.proc.pid).children():
            child.kill()
    sup.cleanup()


def test_workers_refuse_test_bounds_and_zero(settings: Settings) -> None:
    env = {"HERALD_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "HERALD_METRICS_PORT": "-1"}
    run = herald_cli("ingest", "--workers", "2", "--timeout", "5", env=env)
    assert run.returncode == 2 and "not with --workers" in run.stderr and "Traceback" not in run.stderr
    run = herald_cli("ingest", "--workers", "0", env=env)
    assert run.returncode == 2 and "--workers must be 1 or more" in run.stderr
