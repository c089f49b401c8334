"""SIGKILL ``herald deliver --channel email`` under load, again and again: no email is lost,
and the duplicates (counted by Message-ID at a real SMTP server) stay within the send-once
window DESIGN.md documents."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from herald.processes import deliver_group
from tests.conftest import Backend
from tests.smtp_peer import SmtpPeer
from tests.test_deliver import critical, dlq, send_events, wait_until
from tests.test_deliver_scale import all_sent, deliver_process, kill_mid_flight, scale_settings, statuses
from tests.test_email import mailbox

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Conn = psycopg.Connection[tuple[object, ...]]


@pytest.fixture
def smtp() -> Iterator[SmtpPeer]:
    p = SmtpPeer()
    yield p
    p.close()


def test_sigkill_the_email_deliverer_three_times_loses_nothing(
    db: Conn, backend: Backend, smtp: SmtpPeer, tmp_path: Path
) -> None:
    settings = scale_settings(
        backend, delivery={"lease_s": 2, "concurrency": 16}, policy={"rate_limits": {"email": 100_000}}
    )
    mailbox(db, settings, "gus", "slow40@example.org")
    n = 1500
    send_events(settings, *(critical("gus", title=f"n{i}") for i in range(n)))
    group = deliver_group("email") + "-" + uuid.uuid4().hex[:6]
    proc = deliver_process(
        settings,
        group,
        tmp_path,
        "email",
        HERALD_SESSION_TIMEOUT_MS="3000",
        HERALD_SMTP__HOST="127.0.0.1",
        HERALD_SMTP__PORT=str(smtp.port),
        HERALD_SMTP__TLS="none",
        HERALD_SMTP__FROM="herald@example.com",
        HERALD_SMTP__POOL_SIZE="16",
        HERALD_POLICY__RATE_LIMITS='{"email": 100000}',
    )
    try:
        kills = kill_mid_flight(
            proc, 3, lambda: len(smtp.received), lambda: statuses(db, "gus", "email")["sent"] >= n, seed=11
        )
        wait_until(lambda: all_sent(db, "gus", n, "email"), timeout=120, what=f"all {n} sent")
    finally:
        proc.cleanup()
    assert kills >= 3, f"only {kills} kills landed mid-flight: the load finished too soon"
    received = smtp.ids()
    assert len(received) == n, "every email reached the server"
    duplicates = sum(c - 1 for c in received.values())
    # The documented window: per kill, at most the sends in flight and those finished but not
    # yet recorded (each bounded by the concurrency).
    print(f"\nsend-once window: {duplicates} duplicate emails over {kills} SIGKILLs (concurrency 16)")
    assert duplicates <= kills * 2 * 16, f"{duplicates} duplicates over {kills} kills"
    assert dlq(settings, "email") == []
