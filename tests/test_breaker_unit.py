"""The circuit breaker's rules, on a clock the test moves (no sleeps)."""

from __future__ import annotations

from channels.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **kw: float) -> CircuitBreaker:
    args = {"failure_ratio": 0.7, "min_attempts": 10, "window_s": 300.0, "cooldown_s": 30.0}
    args.update(kw)
    return CircuitBreaker(channel="test", clock=clock, **args)  # type: ignore[arg-type]


def test_opens_at_the_ratio_only_after_the_minimum_attempts() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(9):
        assert b.admit("h") == "send"
        b.record("h", failed=True)
    assert b.state("h") == "closed", "9 attempts are under the minimum of 10"
    b.record("h", failed=True)
    assert b.state("h") == "open"
    assert b.admit("h") == "hold"
    assert b.reopens_in("h") == 30.0


def test_stays_closed_below_the_ratio() -> None:
    clock = Clock()
    b = breaker(clock)
    for i in range(100):
        b.record("h", failed=i % 5 in (0, 2, 4))  # 60% failures, spread out
    assert b.state("h") == "closed"


def test_failures_outside_the_window_are_forgotten() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(9):
        b.record("h", failed=True)
    clock.now += 301  # the window has moved past all nine
    b.record("h", failed=True)
    assert b.state("h") == "closed"
    for _ in range(8):
        b.record("h", failed=True)
    assert b.state("h") == "closed", "nine recent failures: still under the minimum"
    b.record("h", failed=True)
    assert b.state("h") == "open"


def test_one_probe_after_the_cooldown_then_closed_on_success() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(10):
        b.record("h", failed=True)
    clock.now += 29.9
    assert b.admit("h") == "hold"
    clock.now += 0.2
    assert b.admit("h") == "probe"
    assert b.admit("h") == "hold", "only one probe at a time"
    assert b.reopens_in("h") == 1.0, "held while the probe is out: look again soon, not at once"
    b.record("h", failed=False, probe=True)
    assert b.state("h") == "closed"
    assert b.admit("h") == "send"
    b.record("h", failed=True)
    assert b.state("h") == "closed", "closing starts a fresh window"


def test_a_failed_probe_reopens_for_another_cooldown() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(10):
        b.record("h", failed=True)
    clock.now += 31
    assert b.admit("h") == "probe"
    b.record("h", failed=True, probe=True)
    assert b.state("h") == "open"
    assert b.reopens_in("h") == 30.0
    clock.now += 31
    assert b.admit("h") == "probe"


def test_a_cancelled_probe_lets_the_next_one_go() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(10):
        b.record("h", failed=True)
    clock.now += 31
    assert b.admit("h") == "probe"
    b.cancelled("h", probe=True)
    assert b.admit("h") == "probe"


def test_hosts_are_apart_and_late_answers_do_not_count() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(10):
        b.record("down", failed=True)
    assert b.admit("down") == "hold"
    assert b.admit("up") == "send"
    # Sends that left before the circuit opened answer now: the probe decides, not they.
    for _ in range(20):
        b.record("down", failed=False)
    assert b.state("down") == "open"
