"""A circuit breaker per target host: stop spending attempts on a provider that is down.

Closed (the normal state): every send goes out, and its outcome is counted in a sliding
window (``window_s``, kept as a ring of buckets so memory stays flat at any rate). When at
least ``min_attempts`` sends in the window failed in ``failure_ratio`` of cases or more,
the circuit **opens**: nothing goes to that host until ``cooldown_s`` has passed. Then one
send, the probe, is let through (half-open); a probe that passes closes the circuit with a
fresh window, one that fails opens it for another cool-down.

Only answers that say the host is unwell count as failures: timeouts, connection errors,
5xx and 429 (a provider's ``transient``). A 4xx refusal is the host working as meant.

Not thread-safe: the deliverer calls it from its one event loop. ``clock`` is injectable so
that the unit tests need no sleeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from core import metrics

log = logging.getLogger(__name__)

Gate = Literal["send", "probe", "hold"]
BUCKETS = 30
# How long a delivery held while a probe is out waits before it looks again.
PROBE_WAIT_S = 1.0


@dataclass
class _Host:
    # Ring of (bucket number, attempts, failures); the bucket number tells stale slots apart.
    slots: list[list[int]] = field(default_factory=lambda: [[-1, 0, 0] for _ in range(BUCKETS)])
    state: str = "closed"  # closed, open, half_open
    open_until: float = 0.0
    probing: bool = False


class CircuitBreaker:
    def __init__(
        self,
        *,
        channel: str,
        failure_ratio: float = 0.7,
        min_attempts: int = 10,
        window_s: float = 300.0,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channel = channel
        self._ratio = failure_ratio
        self._min = min_attempts
        self._bucket_s = window_s / BUCKETS
        self._cooldown = cooldown_s
        self._clock = clock
        self._hosts: dict[str, _Host] = {}
        self._metrics = metrics.deliver()
        self._count_states()  # the family exists from the start, every state at 0

    def admit(self, host: str) -> Gate:
        """May a send to ``host`` go now: ``send``, ``probe`` (the one trial send), or ``hold``."""
        h = self._hosts.get(host)
        if h is None or h.state == "closed":
            return "send"
        if h.state == "open" and self._clock() >= h.open_until:
            self._set(host, h, "half_open")
        if h.state == "half_open" and not h.probing:
            h.probing = True
            return "probe"
        return "hold"

    def record(self, host: str, failed: bool, *, probe: bool = False) -> None:
        """Count a send's outcome; a failed probe reopens, a passed one closes."""
        h = self._hosts.get(host)
        if h is None:
            h = self._hosts[host] = _Host()
            self._count_states()  # a new host is a closed one
        if probe:
            h.probing = False
            if failed:
                self._open(host, h)
            else:
                h.slots = [[-1, 0, 0] for _ in range(BUCKETS)]
                self._set(host, h, "closed")
            return
        if h.state != "closed":
            return  # a send that left before the circuit opened: the probe decides
        now = int(self._clock() // self._bucket_s)
        slot = h.slots[now % BUCKETS]
        if slot[0] != now:
            slot[:] = [now, 0, 0]
        slot[1] += 1
        slot[2] += failed
        if failed:
            attempts = failures = 0
            for number, a, f in h.slots:
                if number > now - BUCKETS:
                    attempts += a
                    failures += f
            if attempts >= self._min and failures >= self._ratio * attempts:
                self._open(host, h)

    def cancelled(self, host: str, *, probe: bool) -> None:
        """A send given up before it answered (a rebalance): a probe may go again."""
        h = self._hosts.get(host)
        if probe and h is not None:
            h.probing = False

    def reopens_in(self, host: str) -> float:
        """Seconds until ``host`` may be tried again (0 when it may be now). While a probe is
        out, the answer is a short wait (at most a second), not 0: what is held meanwhile must
        not come straight back while the probe is still waiting for its answer."""
        h = self._hosts.get(host)
        if h is None or h.state == "closed":
            return 0.0
        if h.state == "half_open":
            return min(self._cooldown, PROBE_WAIT_S)
        return max(0.0, h.open_until - self._clock())

    def state(self, host: str) -> str:
        h = self._hosts.get(host)
        return "closed" if h is None else h.state

    def _open(self, host: str, h: _Host) -> None:
        h.open_until = self._clock() + self._cooldown
        self._set(host, h, "open")

    def _set(self, host: str, h: _Host, state: str) -> None:
        if h.state != state:
            self._metrics.circuit_changes.labels(self._channel, state).inc()
            # The host goes in the log line, never in a metric label (unbounded cardinality).
            if state == "open":
                log.warning(
                    "deliver-%s: circuit for %s is open: holding its deliveries for %gs, then one probe",
                    self._channel,
                    host,
                    self._cooldown,
                    extra={"channel": self._channel},
                )
            else:
                log.info(
                    "deliver-%s: circuit for %s is %s",
                    self._channel,
                    host,
                    state.replace("_", "-"),
                    extra={"channel": self._channel},
                )
        h.state = state
        self._count_states()

    def _count_states(self) -> None:
        """How many hosts are in each state: low cardinality (states), not a host label."""
        for s in ("closed", "open", "half_open"):
            count = sum(1 for x in self._hosts.values() if x.state == s)
            self._metrics.circuits.labels(self._channel, s).set(count)
