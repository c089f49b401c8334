"""The faults of a chaos run: drawn from the seed, injected one after another, each timed.

A fault starts, lasts a while, is undone (the process restarted, PostgreSQL started, the
provider answering again), and then counts as recovered when what it broke is healthy
again. How long the pipeline then takes to drain its backlog is measured from the lag
samples (``watch.py``), not here.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

KILL_TARGETS = (
    "ingest-1",
    "deliver-webhook",
    "deliver-email",
    "deliver-push",
    "digest",
    "receiver",
    "api",
    "lag-exporter",
)
KILL_WEIGHTS = (4, 3, 2, 2, 2, 2, 1, 1)
PROVIDER_MODES = ("down", "error", "throttle", "slow")
# Groups an extra instance joins for a while (a rebalance when it joins and when it leaves).
REBALANCE_TARGETS = ("ingest-1", "deliver-webhook", "deliver-email", "digest")


@dataclass
class Fault:
    kind: str  # kill, postgres, provider, rebalance, replay
    target: str  # a process, a provider (webhook/push/email), or a group
    at_s: float  # when it is due, from the start of the load
    hold_s: float  # how long it lasts before it is undone
    detail: str = ""
    started: float = 0.0  # epoch seconds
    ended: float = 0.0  # undone
    recovered: float = 0.0  # healthy again
    drained: float = 0.0  # lag back to its steady level (set by the watcher)
    peak_lag: int = 0
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.target}" + (f":{self.detail}" if self.detail else "")

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "detail": self.detail,
            "at_s": round(self.at_s, 1),
            "hold_s": round(self.hold_s, 1),
            "started": self.started,
            "ended": self.ended,
            "recovered_s": round(self.recovered - self.started, 2) if self.recovered else None,
            "drain_s": round(self.drained - self.ended, 2) if self.drained else None,
            "peak_lag": self.peak_lag,
            "error": self.error or None,
            **self.extra,
        }


def schedule(rng: random.Random, duration_s: float) -> list[Fault]:
    """Every kind at least once, more kills and provider outages the longer the run (one
    fault per 20 s of load, at least five), at random times in the first 80% of the load,
    so the last one has time to drain before the load stops."""
    count = max(5, int(duration_s / 20))
    kinds = ["kill", "provider", "postgres", "rebalance", "replay"]
    extra = ["kill", "kill", "provider", "provider", "rebalance", "postgres"]
    while len(kinds) < count:
        kinds.append(rng.choice(extra))
    rng.shuffle(kinds)
    # The replay re-reads the last N minutes: not in the first 20 s, so there is something to read.
    times = sorted(rng.uniform(0.1 * duration_s, 0.8 * duration_s) for _ in kinds)
    faults = []
    for at_s, kind in zip(times, kinds, strict=True):
        if kind == "kill":
            target = rng.choices(KILL_TARGETS, KILL_WEIGHTS)[0]
            faults.append(Fault("kill", target, at_s, rng.uniform(0.5, 3.0)))
        elif kind == "provider":
            provider = rng.choice(("webhook", "push", "email"))
            mode = rng.choice(PROVIDER_MODES)
            faults.append(Fault("provider", provider, at_s, rng.uniform(3.0, 10.0), detail=mode))
        elif kind == "postgres":
            faults.append(Fault("postgres", "postgres", at_s, rng.uniform(2.0, 6.0)))
        elif kind == "rebalance":
            faults.append(Fault("rebalance", rng.choice(REBALANCE_TARGETS), at_s, rng.uniform(5.0, 12.0)))
        else:
            faults.append(Fault("replay", "herald-ingest", max(at_s, 20.0), 0.0, detail="-1m"))
    faults.sort(key=lambda f: f.at_s)
    return faults


class Injector:
    """Runs the schedule on a thread: each fault when due (or as soon as the one before is
    over), through ``actions``, which know the stack (``herald.chaos.run``)."""

    def __init__(self, faults: Sequence[Fault], actions: Actions, started: float) -> None:
        self.faults = list(faults)
        self._actions = actions
        self._started = started

    def run(self, stopped: Callable[[], bool], say: Callable[[str], None]) -> None:
        for fault in self.faults:
            while time.time() < self._started + fault.at_s:
                if stopped():
                    return
                time.sleep(0.1)
            fault.started = time.time()
            say(f"fault {fault.name} at {fault.started - self._started:.1f}s for {fault.hold_s:.1f}s")
            try:
                self._actions.inject(fault)
            except Exception as exc:  # noqa: BLE001 (reported as the fault's error, and a failed run)
                fault.error = f"{type(exc).__name__}: {exc}"
                say(f"fault {fault.name}: {fault.error}")
            if not fault.ended:
                fault.ended = time.time()
            if not fault.recovered:
                fault.recovered = time.time()
            say(f"fault {fault.name} over; recovered in {fault.recovered - fault.started:.1f}s")


class Actions(Protocol):
    """What a fault does; implemented by the run, which holds the processes and peers."""

    def inject(self, fault: Fault) -> None: ...


def run_replay(argv: list[str], env: dict[str, str], timeout: float = 60.0) -> str:
    """``herald replay … --yes`` as an operator types it; its output, or RuntimeError."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"herald replay exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return done.stdout


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
