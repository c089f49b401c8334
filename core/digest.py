"""Pure digest rules: a window's identity and what its digest says. No I/O.

A window is ``(user_id, channel, batch_key, window_start)`` plus a follow-up
``sequence``: 0 for the window itself, 1, 2, ... for windows opened after it was sent
(or filled up) by items of the same event-time window. Its digest's delivery id derives
from that whole key, so each window and follow-up gives one digest, ever.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from config.settings import PolicySettings
from core.policy import DIGEST, TEXT_LIMITS
from core.redaction import redact_then_truncate

DIGEST_NS = uuid.UUID("5f0c2b8e-8d2a-4c41-9b61-0e7d3a9c4f17")


def digest_id(user_id: str, channel: str, batch_key: str, window_start: datetime, sequence: int) -> uuid.UUID:
    """The digest's delivery id: deterministic, so a replay or a second process finds the same."""
    start = int(window_start.timestamp())
    return uuid.uuid5(DIGEST_NS, "\0".join((user_id, channel, batch_key, str(start), str(sequence))))


@dataclass(frozen=True, slots=True)
class DigestItem:
    notification_id: uuid.UUID | None
    title: str
    target_url: str | None


def close_delay(user_id: str, grace_s: float, spread_s: float) -> float:
    """Seconds after its end that a window of ``user_id`` closes: the grace, plus the user's
    fixed share of ``spread_s`` (the same in every process and every run: a hash, not
    Python's salted ``hash``)."""
    if spread_s <= 0:
        return grace_s
    share = int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=4).digest(), "big") / 2**32
    return grace_s + share * spread_s


def title(count: int, batch_key: str) -> str:
    noun = "notification" if count == 1 else "notifications"
    return f"{count} new {noun}" + (f": {batch_key}" if batch_key else "")


def summary(titles: Sequence[str], more: int) -> str:
    text = "; ".join(titles)
    return f"{text} and {more} more" if more else text


def digest_record(
    *,
    delivery_id: uuid.UUID,
    user_id: str,
    channel: str,
    batch_key: str,
    window_start: datetime,
    window_seconds: int,
    sequence: int,
    count: int,
    first: Sequence[DigestItem],
    critical: bool,
    inbox_path: str,
    policy: PolicySettings,
) -> dict[str, Any]:
    """The record of a digest on ``<prefix>.deliveries.<channel>``.

    It has the fields of a single delivery (a channel consumer reads it the same way), plus
    the window, the item ``count`` and its ``first`` items (oldest first). Nothing of a
    notification's body or data. The items' titles and links come from their digest entries,
    which ingest redacted and truncated already; the text made here from them is redacted
    and truncated again, as every text field of a single delivery is.
    """

    def clean(text: str | None, field: str) -> Any:
        return redact_then_truncate(text, policy.redactions, TEXT_LIMITS[field])

    more = count - len(first)
    titles = [i.title for i in first]
    key = clean(batch_key, "batch_key") or ""
    return {
        "delivery_id": str(delivery_id),
        "notification_id": None,
        "user_id": user_id,
        "channel": channel,
        "route": DIGEST,
        "reason": None,
        "severity": "critical" if critical else "warning",
        "type": "digest",
        "category": None,
        "title": clean(title(count, key), "title"),
        "summary": redact_then_truncate(summary(titles, more), policy.redactions, policy.summary_chars),
        "target_url": clean(inbox_path, "target_url"),
        "batch_key": key or None,
        "occurred_at": window_start.isoformat(),
        "window_start": window_start.isoformat(),
        "window_seconds": window_seconds,
        "window_end": (window_start + timedelta(seconds=window_seconds)).isoformat(),
        "sequence": sequence,
        "count": count,
        "items": [
            {
                "notification_id": None if i.notification_id is None else str(i.notification_id),
                "title": t,
                "target_url": i.target_url,
            }
            for i, t in zip(first, titles, strict=True)
        ],
        "more": more,
    }
