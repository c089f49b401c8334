"""Pure pieces of the deliverer: what a try's outcomes make of a row, which tier, which stage."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from channels.base import Endpoint, SendResult
from channels.webhook import absolute_url, retry_after_seconds
from config.settings import Settings, duration_seconds
from consumers.deliver import Item, Work, pick_tier, settle, stage
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
