"""A broker outage under the receiver: 503 with Retry-After while it is frozen, /healthz fails,
and once it is back every request that got a 202 is on the topic.

The broker is a private one, started for this test: freezing the session's broker would
stall every other test's clients. The outage is simulated as DESIGN.md says (SIGSTOP, then
SIGCONT): a restart of the embedded broker would lose its topics.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from herald.embedded import EmbeddedBroker
from herald.inspect import read_topic
from producers.signatures import scheme_for
from producers.topics import Topics
from tests.conftest import Backend
from tests.helpers import make_settings
from tests.receiver_helpers import Client, receiver_settings, running_receiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def private_broker() -> Iterator[EmbeddedBroker]:
    folder = Path(tempfile.mkdtemp(prefix="herald-outage-"))
    broker = EmbeddedBroker(folder / "broker")
    broker.start()
    try:
        yield broker
    finally:
        if broker.pid is not None:
            os.kill(broker.pid, signal.SIGCONT)  # never leave it frozen, whatever failed
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def wait_for(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        time.sleep(0.1)


def test_frozen_broker_gets_503_and_loses_no_accepted_request(
    backend: Backend, private_broker: EmbeddedBroker
) -> None:
    s = receiver_settings(
        make_settings(private_broker.bootstrap, backend.database_url), ack_timeout_s=1.0, retry_after_s=2
    )
    scheme = scheme_for(s.receiver.sources["sw"])
    results: list[tuple[str, int, str | None]] = []  # (webhook-id, status, Retry-After)
    lock = threading.Lock()
    stop = threading.Event()

    def sender(url: str) -> None:
        c = Client(url)
        while not stop.is_set():
            msg_id = f"msg_{uuid.uuid4().hex[:12]}"
            body = b'{"id": "%s", "type": "t", "title": "x", "user_id": "u"}' % msg_id.encode()
            r = c.post("/webhooks/sw", body, scheme.sign(body, event_id=msg_id))
            with lock:
                results.append((msg_id, r.status, r.headers.get("retry-after")))
        c.close()

    def count(status: int) -> int:
        with lock:
            return sum(1 for _, st, _ in results if st == status)

    pid = private_broker.pid
    assert pid is not None
    with running_receiver(s) as run:
        health = Client(run.url)
        threads = [threading.Thread(target=sender, args=(run.url,), daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            wait_for("202s before the outage", lambda: count(202) >= 20, 10)
            os.kill(pid, signal.SIGSTOP)
            try:
                wait_for("503s while frozen", lambda: count(503) >= 4, 15)
                wait_for(
                    "/healthz failing while frozen",
                    lambda: health.request("GET", "/healthz").status == 503,
                    15,
                )
                accepted_before_resume = count(202)
            finally:
                os.kill(pid, signal.SIGCONT)
            wait_for("/healthz ok again", lambda: health.request("GET", "/healthz").status == 200, 30)
            wait_for("202s after the outage", lambda: count(202) >= accepted_before_resume + 20, 30)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            health.close()

    assert {status for _, status, _ in results} <= {202, 503}
    assert all(retry == "2" for _, status, retry in results if status == 503)
    accepted = {msg_id for msg_id, status, _ in results if status == 202}
    on_topic = [r.headers["webhook-id"].decode() for r in read_topic(s, Topics(s.topic_prefix).events)]
    missing = accepted - set(on_topic)
    assert not missing, f"{len(missing)} accepted requests are not on the topic"
    # A 202 is one record: no accepted id was written twice.
    assert all(on_topic.count(msg_id) == 1 for msg_id in accepted)
