"""``herald ingest --workers N``: N ingest consumers of one group under one supervisor.

One Python process runs one batch at a time on one core (the GIL); a host with cores
to spare runs more consumers. The supervisor starts N ``herald ingest`` child processes
(each an ordinary member of the group, so every invariant of one process holds for
each), and is what an orchestrator sees:

- one ``/metrics``: each child serves its own on a loopback port; a scrape of the
  supervisor reads them all and returns every sample with a ``worker`` label (``0`` ..
  ``N-1``), so the series of two children never collide;
- one ``/healthz``: ok while every child answers ok;
- SIGTERM or SIGINT: passed to every child, each of which finishes its batch in hand and
  leaves the group; the supervisor exits 0 when all of them did;
- the supervisor killed (SIGKILL): each child gets SIGTERM from the kernel (Linux's
  parent-death signal) and leaves the group as on a stop;
- a child that exits on its own (a fatal error, SIGKILL, the OOM killer): the supervisor
  stops the others and exits 1, so the orchestrator restarts the whole process. It never
  restarts a child itself: a crash loop stays visible where it is watched.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from config.settings import Settings
from consumers.loop import Stopper
from core.http import Health, serve
from herald.embedded import free_port
from herald.processes import herald_command

log = logging.getLogger(__name__)

STOP_GRACE_S = 60.0  # a child that has not left the group by then is killed
_SCRAPE_TIMEOUT_S = 2.0


class _Child:
    def __init__(self, index: int, argv: list[str], env: dict[str, str]) -> None:
        self.index = index
        self.port = int(env["HERALD_METRICS_PORT"])
        self.proc = subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509

    def get(self, path: str) -> tuple[int, bytes]:
        """Status and body of a GET on the child's metrics server; (0, b"") when it does not answer."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=_SCRAPE_TIMEOUT_S) as reply:  # noqa: S310 (loopback)
                return int(reply.status), reply.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()
        except OSError:
            return 0, b""


class WorkerMetrics(Collector):
    """Every child's samples, each with a ``worker`` label, as one exposition."""

    def __init__(self, children: Sequence[_Child]) -> None:
        self._children = children

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for child in self._children:
            status, body = child.get("/metrics")
            if status != 200:
                continue  # starting or gone: its series are absent from this scrape
            for family in text_string_to_metric_families(body.decode()):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type)
                for s in family.samples:
                    out.add_sample(s.name, {**s.labels, "worker": str(child.index)}, s.value, s.timestamp)
        yield from merged.values()


def child_argv(args: Sequence[str], group: str) -> list[str]:
    """The argv of one worker: the supervisor's global options, then ``ingest --group``."""
    return herald_command(*args, "ingest", "--group", group)


def run_workers(settings: Settings, *, group: str, workers: int, global_args: Sequence[str] = ()) -> int:
    """Supervise ``workers`` ingest processes until SIGTERM/SIGINT or one of them exits."""
    stopper = Stopper()
    stopper.install()
    health = Health(stale_after=10.0)
    children: list[_Child] = []
    with ExitStack() as stack:
        if settings.metrics_port >= 0:  # bound first: a busy port fails before any child starts
            registry = CollectorRegistry(auto_describe=False)
            registry.register(WorkerMetrics(children))
            server = serve(settings.metrics_host, settings.metrics_port, health, registry)
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
        for i in range(workers):
            env = {**os.environ, "HERALD_METRICS_HOST": "127.0.0.1", "HERALD_METRICS_PORT": str(free_port())}
            children.append(_Child(i, child_argv(global_args, group), env))
        stack.callback(_stop, children)
        log.info("ingest: %d workers in group %s (pids %s)", workers, group, [c.proc.pid for c in children])
        while not stopper.stopping:
            gone = [c for c in children if c.proc.poll() is not None]
            if gone:
                c = gone[0]
                health.fail(f"worker {c.index} exited with {c.proc.returncode}")
                log.error(
                    "ingest: worker %d (pid %d) exited with %s: stopping the others; restart herald ingest",
                    c.index,
                    c.proc.pid,
                    c.proc.returncode,
                )
                return 1
            if all(c.get("/healthz")[0] == 200 for c in children):
                health.beat()
            stopper.event.wait(1.0)
        log.info("ingest: stopping %d workers", workers)
    codes = [c.proc.returncode for c in children]
    return 0 if all(code == 0 for code in codes) else 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux),
    so a killed supervisor never leaves workers consuming behind it."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _stop(children: Sequence[_Child]) -> None:
    """SIGTERM to every child still running, then wait; SIGKILL after the grace."""
    for c in children:
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for c in children:
        try:
            c.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error(
                "ingest: worker %d did not stop within %.0f s of SIGTERM: killed", c.index, STOP_GRACE_S
            )
            c.proc.kill()
            c.proc.wait()
