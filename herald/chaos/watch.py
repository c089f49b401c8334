"""What a chaos run watches while it runs, once a second: each herald process's RSS, the
lag of every herald group, and the counters of each process instance (kept per instance, so
a killed process's last reading survives it: the run compares them with the database)."""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psutil
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from consumers.offsets import Kafka, LagReader

log = logging.getLogger(__name__)

# The counters the end state is checked against: family -> the labels that key them.
COUNTERS = {
    "herald_ingest_events": ("outcome",),
    "herald_deliver_outcomes": ("channel", "outcome"),
    "herald_digests": ("channel", "outcome"),
}

CounterKey = tuple[str, tuple[str, ...]]


@dataclass
class Instance:
    """One process instance (a restart is a new one): its latest counters and peak RSS."""

    name: str
    pid: int
    port: int
    counters: dict[CounterKey, float] = field(default_factory=dict)
    scraped: float = 0.0
    peak_rss: int = 0
    stopped: str = ""  # "", "killed", "stopped"


@dataclass
class LagPoint:
    at: float
    late: int  # records waiting (due) on every herald group
    oldest_s: float  # the oldest waiting record's age


def scrape(port: int, timeout: float = 2.0) -> dict[CounterKey, float]:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback http)
        text = resp.read().decode()
    out: dict[CounterKey, float] = {}
    for family in text_string_to_metric_families(text):
        labels = COUNTERS.get(family.name)
        if labels is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[(family.name, tuple(sample.labels.get(k, "") for k in labels))] = sample.value
    return out


class Watcher:
    def __init__(self, settings: Settings, groups: Sequence[str], interval_s: float = 1.0) -> None:
        self._settings = settings
        self._groups = list(groups)
        self._interval = interval_s
        self.instances: dict[int, Instance] = {}  # by pid
        self.lag: list[LagPoint] = []
        self.lag_errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-watch", daemon=True)
        self._procs: Callable[[], list[tuple[str, int, int]]] = list

    def start(self, procs: Callable[[], list[tuple[str, int, int]]]) -> None:
        """``procs``: the running herald processes as (name, pid, metrics port)."""
        self._procs = procs
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def instance(self, name: str, pid: int, port: int) -> Instance:
        with self._lock:
            inst = self.instances.get(pid)
            if inst is None or inst.name != name:
                inst = self.instances[pid] = Instance(name, pid, port)
            return inst

    def read_instance(self, name: str, pid: int, port: int) -> None:
        """Counters and RSS of one instance now (the run calls it just before a kill or a stop)."""
        inst = self.instance(name, pid, port)
        try:
            inst.peak_rss = max(inst.peak_rss, psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            pass
        try:
            inst.counters = scrape(port)
            inst.scraped = time.time()
        except OSError:
            pass  # not serving yet, or going: the last reading stands

    def mark(self, pid: int, how: str) -> None:
        with self._lock:
            if pid in self.instances:
                self.instances[pid].stopped = how

    def _run(self) -> None:
        with Kafka(self._settings) as k:
            reader = LagReader(k, self._settings)
            while not self._stop.wait(self._interval):
                for name, pid, port in self._procs():
                    self.read_instance(name, pid, port)
                try:
                    sample = reader.sample(self._groups)
                except Exception as exc:  # noqa: BLE001 (a broker hiccup: the next sample comes)
                    self.lag_errors += 1
                    log.debug("lag sample failed: %s", exc)
                    continue
                waiting = [r for r in sample.rows if r.waiting]
                self.lag.append(
                    LagPoint(
                        time.time(),
                        sum(r.lag for r in waiting),
                        max((r.lag_seconds for r in waiting), default=0.0),
                    )
                )

    def peak_rss_mb(self) -> dict[str, float]:
        """Per process name (ingest-1, deliver-webhook, ...), over all its instances."""
        out: dict[str, float] = {}
        for inst in self.instances.values():
            out[inst.name] = max(out.get(inst.name, 0.0), inst.peak_rss / 2**20)
        return {k: round(v, 1) for k, v in sorted(out.items())}

    def counter(self, family: str, *labels: str, kinds: Sequence[str] = ()) -> tuple[float, int]:
        """The sum over every instance of one counter, and how many of those instances were
        killed or stopped (their last reading may miss what they did after it)."""
        total, lost = 0.0, 0
        for inst in self.instances.values():
            if kinds and not any(inst.name.startswith(k) for k in kinds):
                continue
            value = inst.counters.get((family, tuple(labels)))
            if value is not None:
                total += value
            lost += bool(inst.stopped)
        return total, lost
