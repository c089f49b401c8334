"""``herald lag-exporter``: consumer lag as Prometheus gauges that stay true.

Each turn, in this order:

1. one sample through ``LagReader`` (``consumers/offsets.py``, the computation ``herald lag``
   prints): per group, topic and partition the lag in records and the age of the oldest
   unconsumed record, and each group's state;
2. each group's status from the samples so far (``StatusJudge``);
3. the collector's snapshot is replaced at once: a scrape serves the last whole sample,
   never a half-taken one, and makes no broker call.

A failed sample is counted and logged; the last good snapshot stays, and
``herald_lag_exporter_last_success_timestamp_seconds`` says how old it is. Only the first
sample's failure stops the process (a wrong bootstrap is a one-line error at start).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from config.settings import Settings
from consumers.loop import Stopper
from consumers.offsets import Kafka, LagReader, LagSample, is_active
from core.errors import HeraldError
from core.http import Health
from core.metrics import LagExporterMetrics, PartitionLag

log = logging.getLogger(__name__)

Key = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class _Seen:
    committed: int | None
    waiting_since: float | None  # monotonic seconds; None while nothing due waits


class StatusJudge:
    """A group's status from samples of its committed offsets over time.

    - ``stopped``: no active member (the broker's group state) while due records wait;
    - ``stalled``: active, and on some partition due records have waited for
      ``stalled_after_s`` without the committed offset moving;
    - ``ok`` otherwise. Records on a retry topic that are not yet due are not waiting, so a
      deliverer that holds them paused is ``ok``.

    A partition's clock starts when due records are first seen waiting on it, and starts
    again whenever its committed offset moves: an idle partition that gets a record is not
    stalled for having been idle, and a slow consumer that commits is never stalled.
    """

    def __init__(self, stalled_after_s: float) -> None:
        self.stalled_after_s = stalled_after_s
        self._seen: dict[Key, _Seen] = {}

    def judge(self, sample: LagSample, now: float, groups: Sequence[str] = ()) -> dict[str, str]:
        """Status of each group with a partition in ``sample``, and of each of ``groups``."""
        seen: dict[Key, _Seen] = {}
        waiting: dict[str, bool] = dict.fromkeys(groups, False)
        stuck: dict[str, bool] = dict.fromkeys(groups, False)
        for row in sample.rows:
            key = (row.group, row.topic, row.partition)
            before = self._seen.get(key)
            since = None
            if row.waiting:
                kept = before is not None and before.committed == row.committed
                since = before.waiting_since if kept and before is not None else None
                since = now if since is None else since
            seen[key] = _Seen(row.committed, since)
            waiting[row.group] = waiting.get(row.group, False) or row.waiting
            late = since is not None and now - since >= self.stalled_after_s
            stuck[row.group] = stuck.get(row.group, False) or late
        self._seen = seen
        out = {}
        for group in waiting:
            state = sample.states.get(group)
            active = state is not None and is_active(state)
            if waiting[group] and not active:
                out[group] = "stopped"
            elif active and stuck[group]:
                out[group] = "stalled"
            else:
                out[group] = "ok"
        return out


class LagExporter:
    """Samples the broker every ``interval_s`` and serves the result (module docstring)."""

    def __init__(
        self,
        settings: Settings,
        kafka: Kafka,
        groups: Sequence[str],
        metrics: LagExporterMetrics,
        health: Health,
    ) -> None:
        self.cfg = settings.lag_exporter
        self.groups = list(dict.fromkeys([*groups, *self.cfg.groups]))
        self.reader = LagReader(kafka, settings)
        self.judge = StatusJudge(self.cfg.stalled_after_s)
        self.metrics = metrics
        self.health = health
        self.statuses: dict[str, str] = {}
        self.samples = 0

    def sample(self) -> LagSample:
        """One turn: steps 1 to 3 of the module docstring."""
        started = time.monotonic()
        sample = self.reader.sample(self.groups, discover=True)
        statuses = self.judge.judge(sample, time.monotonic(), self.groups)
        rows = [PartitionLag(r.group, r.topic, r.partition, r.lag, r.lag_seconds) for r in sample.rows]
        self.metrics.lag.update(rows, statuses)
        self.metrics.last_success.set(sample.at_ms / 1000)
        self.metrics.sample_seconds.observe(time.monotonic() - started)
        self.health.beat()
        self._log_changes(statuses)
        self.samples += 1
        return sample

    def _log_changes(self, statuses: dict[str, str]) -> None:
        for group, status in sorted(statuses.items()):
            before = self.statuses.get(group)
            if before is not None and before != status:
                level = logging.INFO if status == "ok" else logging.WARNING
                log.log(level, "group %s: %s -> %s", group, before, status, extra={"group": group})
        self.statuses = statuses

    def run(self, stopper: Stopper, max_samples: int | None = None) -> int:
        """Until stopped (or ``max_samples`` taken); returns the samples taken."""
        first = self.sample()  # its failure is the process's: a wrong bootstrap stops here
        log.info(
            "lag-exporter: %d groups on %d partitions, a sample every %.0fs",
            len({r.group for r in first.rows} | set(self.groups)),
            len(first.rows),
            self.cfg.interval_s,
        )
        while max_samples is None or self.samples < max_samples:
            if stopper.event.wait(self.cfg.interval_s):
                break
            try:
                self.sample()
            except HeraldError as exc:
                self.metrics.errors.inc()
                log.warning("lag-exporter: sample failed, keeping the last one: %s", exc)
        return self.samples
