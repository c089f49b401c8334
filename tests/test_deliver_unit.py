"""Pure pieces of the deliverer: what a try's outcomes make of a row, which tier, which stage."""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME
from pydantic import ValidationError

from channels.base import Endpoint, SendResult
from channels.webhook import absolute_url, retry_after_seconds
from config.settings import Settings, duration_seconds
from consumers.deliver import DeliverHandler, Item, Work, pick_tier, settle, stage, urgent
from storage.deliveries import RowState


def work(attempt: int, results: dict[int, SendResult], settled: dict[int, str] | None = None) -> Work:
    item = Item(None, "t", 0, 0, {}, uuid.uuid4(), attempt - 1, 0)  # type: ignore[arg-type]
    targets = [Endpoint(e, "u", "http://x", "whsec_x") for e in results]
    return Work(item, attempt, targets, settled or {}, results)


def test_settle() -> None:
    ok, t = SendResult("ok"), SendResult("transient", 503, "HTTP 503")
    p, g = SendResult("permanent", 400, "HTTP 400"), SendResult("gone", 410, "gone")
    assert settle(work(1, {1: ok}), 3).status == "sent"
    assert (settle(work(1, {}), 3).status, settle(work(1, {}), 3).reason) == ("skipped", "no_endpoint")
    assert settle(work(1, {1: ok, 2: t}), 3).status == "retrying"
    v = settle(work(3, {2: t}, {1: "ok"}), 3)
    assert (v.status, v.reason) == ("failed", "exhausted")
    assert (settle(work(1, {1: p}), 3).status, settle(work(1, {1: p}), 3).reason) == ("failed", "permanent")
    assert settle(work(1, {1: g}), 3).reason == "endpoint_gone"
    # One push subscription gone, the user's other one took it: delivered (the gone one is disabled).
    assert settle(work(1, {1: g, 2: ok}), 3).status == "sent"
    assert settle(work(2, {2: g}, {1: "ok"}), 3).status == "sent"
    # A retry that found endpoint 2 fine, after endpoint 1 refused for good on try 1.
    assert settle(work(2, {2: ok}, {1: "permanent"}), 3).reason == "permanent"
    # Only the earlier try's success remains (the other endpoint was removed since): sent.
    assert settle(work(2, {}, {1: "ok"}), 3).status == "sent"
    # The longest Retry-After of the transient answers wins.
    slow = SendResult("transient", 429, "HTTP 429", retry_after_s=30)
    assert settle(work(1, {1: t, 2: slow}), 3).retry_after_s == 30


def test_pick_tier() -> None:
    tiers = [5.0, 60.0, 300.0, 1800.0]
    assert [pick_tier(tiers, a, None) for a in (1, 2, 3, 4, 5, 7)] == [0, 1, 2, 3, 3, 3]
    assert pick_tier(tiers, 1, 30) == 1, "a Retry-After longer than the tier picks a later one"
    assert pick_tier(tiers, 1, 5) == 0
    assert pick_tier(tiers, 1, 7200) == 3
    assert pick_tier(tiers, 3, 1) == 2, "never an earlier tier"


def row(status: str, attempts: int, lease_s: float | None = None) -> RowState:
    now = datetime.now(UTC)
    return RowState(status, attempts, None if lease_s is None else now + timedelta(seconds=lease_s), now)


def item(attempts_before: int) -> Any:
    return Item(None, "t", 0, 0, {}, uuid.uuid4(), attempts_before, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "before", "expected"),
    [
        (None, 0, "missing"),
        (row("queued", 0), 0, "claim"),
        (row("retrying", 2), 2, "claim"),
        (row("retrying", 2), 1, "stale"),  # the copy of an earlier stage
        (row("queued", 0), 1, "stale"),
        (row("sending", 1, lease_s=30), 0, "leased"),
        (row("sending", 1, lease_s=-1), 0, "claim"),  # its consumer died mid-send
        (row("sending", 2, lease_s=30), 0, "stale"),
        (row("sent", 1), 0, "sent"),
        (row("failed", 8), 7, "failed"),
        (row("skipped", 1), 0, "skipped"),
        (row("digested", 0), 0, "digested"),
    ],
)
def test_stage(state: RowState | None, before: int, expected: str) -> None:
    assert stage(item(before), state) == expected


def test_retry_after_parsing() -> None:
    now = 1_000_000.0
    assert retry_after_seconds("17", now) == 17
    assert retry_after_seconds(None) is None and retry_after_seconds("") is None
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds("Mon, 12 Jan 1970 13:46:50 GMT", now) == 10.0
    assert retry_after_seconds("Mon, 01 Jan 1970 00:00:00 GMT", now) == 0.0, "a past date: now"


def test_absolute_url() -> None:
    assert absolute_url("/a/b", "https://app.example.com") == "https://app.example.com/a/b"
    assert absolute_url("a/b", "https://app.example.com/base/") == "https://app.example.com/base/a/b"
    assert absolute_url("https://other.example/x", "https://app.example.com") == "https://other.example/x"
    assert absolute_url("/a", None) == "/a"
    assert absolute_url(None, "https://app.example.com") is None


def test_durations_and_tier_settings(no_herald_env: None) -> None:
    assert [duration_seconds(t) for t in ("500ms", "5s", "1m", "30m", "2h")] == [0.5, 5, 60, 1800, 7200]
    for bad in ("5", "1.5s", "0s", "5 s", "1d", "-1s"):
        with pytest.raises(ValueError, match="not a duration"):
            duration_seconds(bad)
    with pytest.raises(ValidationError, match="must grow"):
        Settings(delivery={"retry_tiers": ["1m", "5s"]})
    with pytest.raises(ValidationError, match="at least one"):
        Settings(delivery={"retry_tiers": []})
    with pytest.raises(ValidationError, match="HERALD_APP_URL"):
        Settings(app_url="app.example.com")
    assert Settings().delivery.retry_tiers == ("5s", "1m", "5m", "30m")
    assert Settings().delivery.max_attempts == 8


class GatedProvider:
    """Every send waits until the test lets one end; the order sends start in is recorded."""

    channel = "webhook"

    def __init__(self) -> None:
        self.started: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.gate = threading.Semaphore(0)

    def target(self, endpoint: Endpoint) -> str:
        return "x"

    async def send(self, endpoint: Endpoint, delivery: dict[str, Any]) -> SendResult:
        self.started.put(str(delivery["title"]))
        while not self.gate.acquire(blocking=False):
            await asyncio.sleep(0.001)
        return SendResult("ok")

    async def aclose(self) -> None:
        return None


class Record:
    """What the deliverer reads of a record once it is parsed: headers and a timestamp."""

    def headers(self) -> list[tuple[str, bytes]]:
        return []

    def timestamp(self) -> tuple[int, int]:
        return (TIMESTAMP_CREATE_TIME, 0)


def queued(title: str, severity: str, kind: str = "notification") -> Work:
    payload = {"title": title, "severity": severity, "type": kind, "user_id": "u"}
    it = Item(Record(), "t", 0, 0, payload, uuid.uuid4(), 0, 0)  # type: ignore[arg-type]
    return Work(it, 1, [Endpoint(1, "u", "http://x", "whsec_x")], {})


def started(provider: GatedProvider, n: int) -> list[str]:
    return [provider.started.get(timeout=5) for _ in range(n)]


def test_criticals_overtake_for_a_send_slot(no_herald_env: None) -> None:
    """Ten slots, one kept for criticals: nine warnings and digests start, a critical
    launched after three more takes the tenth, and the next critical takes the first slot
    that frees, ahead of the three that waited before it."""
    provider = GatedProvider()
    settings = Settings(delivery={"concurrency": 10})
    handler = DeliverHandler(settings, None, None, provider)  # type: ignore[arg-type]
    try:
        for i in range(12):
            handler._launch(queued(f"w{i}", "warning", "digest" if i % 2 else "notification"))
        assert started(provider, 9) == [f"w{i}" for i in range(9)]
        handler._launch(queued("c0", "critical"))
        handler._launch(queued("c1", "critical"))
        assert started(provider, 1) == ["c0"], "the slot kept for criticals"
        assert provider.started.empty(), "every slot taken: c1 waits"
        provider.gate.release()
        assert started(provider, 1) == ["c1"], "the first slot to free goes to the waiting critical"
        provider.gate.release(13)
        assert sorted(started(provider, 3)) == ["w10", "w11", "w9"]
        done = [handler._finished.get(timeout=5) for _ in range(14)]
        assert all(not w.cancelled and w.results[1].outcome == "ok" for w in done)
    finally:
        handler.close()


def test_interrupt_gives_back_what_waits_for_a_slot(no_herald_env: None) -> None:
    provider = GatedProvider()
    handler = DeliverHandler(Settings(delivery={"concurrency": 2}), None, None, provider)  # type: ignore[arg-type]
    try:
        for i in range(5):
            handler._launch(queued(f"w{i}", "warning"))
        assert started(provider, 2) == ["w0", "w1"]
        handler.interrupt()
        back = [handler._finished.get(timeout=5) for _ in range(3)]
        assert sorted(w.item.payload["title"] for w in back) == ["w2", "w3", "w4"]  # type: ignore[index]
        assert all(w.cancelled and not w.results for w in back), "never sent: claims go back"
        provider.gate.release(2)
        sent = [handler._finished.get(timeout=5) for _ in range(2)]
        assert all(not w.cancelled for w in sent), "what was sending finishes within the grace"
        assert provider.started.empty()
    finally:
        handler.close()


def test_urgent() -> None:
    assert urgent(queued("c", "critical").item)
    assert not urgent(queued("c", "critical", "digest").item)
    assert not urgent(queued("w", "warning").item)
