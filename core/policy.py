"""Pure policy: which channels a notification goes to, and how.

Nothing here does I/O, so every rule is a plain unit test.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from config.settings import CHANNELS, PolicySettings
from core.envelope import Notification
from core.ids import uuid5
from core.redaction import redact_then_truncate

DELIVERY_NS = uuid.UUID("0b9d6a3e-71c4-4f25-8e1a-5c3d2b7f9e04")

IMMEDIATE = "immediate"
DIGEST = "digest"
REASON_WARNING = "warning"
REASON_RATE_LIMITED = "rate_limited"


PREFERENCE_CHANNELS: tuple[str, ...] = ("in_app", *CHANNELS)
DEFAULT_WINDOW_SECONDS = 300


@dataclass(frozen=True, slots=True)
class Preferences:
    """A user's choices; ``None`` in storage means the policy default.

    ``categories`` holds per-category opt-outs, ``{"billing": {"email": False}}``: a channel
    a category does not name follows the channel switch. ``mandatory`` (from settings) lists
    the categories users cannot opt out of: their per-category choices are ignored and in-app
    off never hides them, so they always reach the inbox.
    """

    in_app: bool
    email: bool
    push: bool
    webhook: bool
    digest_minutes: int
    categories: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)
    mandatory: frozenset[str] = frozenset()
    # HERALD_POLICY__DIGEST_SECONDS (tests, demos): overrides digest_minutes; never stored.
    digest_seconds: int | None = None

    @classmethod
    def defaults(cls, policy: PolicySettings) -> Preferences:
        return cls(
            in_app=policy.in_app,
            email=policy.email,
            push=policy.push,
            webhook=policy.webhook,
            digest_minutes=policy.digest_minutes,
            mandatory=policy.mandatory_categories,
            digest_seconds=policy.digest_seconds,
        )

    def merged(self, stored: dict[str, Any]) -> Preferences:
        """Stored values override defaults where they are set (``mandatory`` is never stored)."""
        values = {k: v for k, v in stored.items() if v is not None and k in _STORED}
        return replace(self, **values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "in_app": self.in_app,
            "email": self.email,
            "push": self.push,
            "webhook": self.webhook,
            "digest_minutes": self.digest_minutes,
        }

    @property
    def window_seconds(self) -> int:
        """The user's digest window length; with digests off (0 minutes) rate-limited sends
        still fold into a window, of the default length."""
        return self.digest_seconds or self.digest_minutes * 60 or DEFAULT_WINDOW_SECONDS

    def channel_on(self, channel: str, category: str | None = None) -> bool:
        """The channel switch, then the category's opt-out for that channel (unless mandatory)."""
        if category is not None and category in self.mandatory:
            # Cannot opt out of the category; in-app always shows it, external channels
            # still follow the channel switches (which say where to reach the user).
            return channel == "in_app" or bool(getattr(self, channel))
        if not getattr(self, channel):
            return False
        if category is None:
            return True
        return self.categories.get(category, {}).get(channel, True) is not False

    def hidden(self, category: str | None) -> bool:
        """Stored but never listed or counted: in-app off, for this category or altogether."""
        return not self.channel_on("in_app", category)


_STORED = frozenset({"in_app", "email", "push", "webhook", "digest_minutes", "categories"})


@dataclass(slots=True)
class Decision:
    """One (notification, channel) outcome: a delivery row and one topic record. Immutable in use."""

    notification: Notification
    channel: str
    route: str
    reason: str | None
    delivery_id: uuid.UUID
    # The user's digest window length, fixed at ingest (used when the route is the digest).
    window_seconds: int = DEFAULT_WINDOW_SECONDS

    def to_digest(self, reason: str) -> Decision:
        return Decision(
            self.notification, self.channel, DIGEST, reason, self.delivery_id, self.window_seconds
        )

    @property
    def window_start(self) -> datetime | None:
        """The digest window this delivery falls in (None when it goes out at once)."""
        if self.route != DIGEST:
            return None
        return align_window(self.notification.occurred_at, self.window_seconds)


def delivery_id(notification_id: uuid.UUID, channel: str) -> uuid.UUID:
    return uuid5(DELIVERY_NS, f"{notification_id}:{channel}")


def plan(notification: Notification, prefs: Preferences) -> list[Decision]:
    """Channels before rate limits: external only for warning and critical, where the channel
    is on and the notification's category is not turned off for it (see ``Preferences``)."""
    if not notification.external:
        return []
    out = []
    for channel in CHANNELS:
        if not prefs.channel_on(channel, notification.category):
            continue
        did = delivery_id(notification.id, channel)
        if notification.severity == "critical" or prefs.digest_minutes == 0:
            out.append(Decision(notification, channel, IMMEDIATE, None, did, prefs.window_seconds))
        else:
            out.append(Decision(notification, channel, DIGEST, REASON_WARNING, did, prefs.window_seconds))
    return out


def align_window(ts: datetime, seconds: int) -> datetime:
    """Tumbling windows aligned to multiples of their length since the epoch, in event time:
    a replay forms exactly the same windows (DESIGN.md)."""
    epoch = int(ts.timestamp() // seconds) * seconds
    return datetime.fromtimestamp(epoch, UTC)


def rate_window(ts: datetime) -> datetime:
    """Rate limits count per user and channel in one-minute event-time windows."""
    return ts.replace(second=0, microsecond=0)


RateKey = tuple[str, str, datetime]


def rate_key(decision: Decision) -> RateKey:
    return (decision.notification.user_id, decision.channel, rate_window(decision.notification.occurred_at))


def requested(decisions: Iterable[Decision]) -> Counter[RateKey]:
    """How many immediate sends this batch asks for, per counter row."""
    return Counter(rate_key(d) for d in decisions if d.route == IMMEDIATE)


def apply_rate_limits(
    decisions: Sequence[Decision],
    counts_after: dict[RateKey, int],
    policy: PolicySettings,
) -> list[Decision]:
    """Fold immediate sends over the limit into the digest, with reason ``rate_limited``.

    ``counts_after`` is each counter after this batch's requests were added, so the
    sends before this batch are ``counts_after - requested``; within the batch the
    first ones (in batch order) keep their slot.
    """
    asked = requested(decisions)
    used = {key: counts_after[key] - n for key, n in asked.items()}
    out = []
    for d in decisions:
        if d.route != IMMEDIATE:
            out.append(d)
            continue
        key = rate_key(d)
        if used[key] < policy.rate_limit(d.channel):
            out.append(d)
        else:
            out.append(d.to_digest(REASON_RATE_LIMITED))
        used[key] += 1
    return out


# What each text field that leaves the system is cut to, after redaction (DESIGN.md: the whole list).
TEXT_LIMITS = {"type": 200, "category": 100, "title": 200, "target_url": 2000, "batch_key": 500}


def external_record(
    *,
    delivery_id: uuid.UUID,
    notification_id: uuid.UUID,
    user_id: str,
    channel: str,
    route: str,
    reason: str | None,
    severity: str,
    type: str,
    category: str | None,
    title: str,
    summary: str | None,
    target_url: str | None,
    batch_key: str | None,
    occurred_at: datetime,
    policy: PolicySettings,
    window_start: datetime | None = None,
    window_seconds: int | None = None,
) -> dict[str, Any]:
    """What may leave the system: ids, channel, title, summary, link. Never body or data.

    Every text field is redacted, then truncated (``core/redaction.py`` says why that order).
    """
    record: dict[str, Any] = {
        "delivery_id": str(delivery_id),
        "notification_id": str(notification_id),
        "user_id": user_id,
        "channel": channel,
        "route": route,
        "reason": reason,
        "severity": severity,
        "type": _clean(type, "type", policy),
        "category": _clean(category, "category", policy),
        "title": _clean(title, "title", policy),
        "summary": redact_then_truncate(summary, policy.redactions, policy.summary_chars),
        "target_url": _clean(target_url, "target_url", policy),
        "batch_key": _clean(batch_key, "batch_key", policy),
        "occurred_at": occurred_at.isoformat(),
    }
    if window_start is not None and window_seconds is not None:
        # The digest window, fixed at ingest (a digest entry's only).
        record["window_start"] = window_start.isoformat()
        record["window_seconds"] = window_seconds
    return record


def _clean(text: str | None, field: str, policy: PolicySettings) -> Any:
    return redact_then_truncate(text, policy.redactions, TEXT_LIMITS[field])


def decision_record(decision: Decision, policy: PolicySettings) -> dict[str, Any]:
    n = decision.notification
    return external_record(
        delivery_id=decision.delivery_id,
        notification_id=n.id,
        user_id=n.user_id,
        channel=decision.channel,
        route=decision.route,
        reason=decision.reason,
        severity=n.severity,
        type=n.type,
        category=n.category,
        title=n.title,
        summary=n.summary,
        target_url=n.target_url,
        batch_key=n.batch_key,
        occurred_at=n.occurred_at,
        policy=policy,
        window_start=decision.window_start,
        window_seconds=decision.window_seconds if decision.route == DIGEST else None,
    )
