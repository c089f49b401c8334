"""Batch statements for channel consumers: claim, look up, record. Never one per delivery.

A delivery row moves ``queued`` → ``sending`` (claimed, with a lease) → ``sent`` |
``retrying`` | ``failed`` | ``skipped``; a ``retrying`` row is claimed again by its retry
record. A record carries how many tries came before it (``attempts``), and a row is
claimed only by the record of its current stage: status ``queued``/``retrying`` with the
same number of attempts, or ``sending`` with an expired lease (its consumer died
mid-send) one attempt later. Any other record of that delivery is a stale copy.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

Cursor = psycopg.Cursor[tuple[Any, ...]]

# Statuses a row never leaves: a record for it is skipped, and counted.
FINAL = frozenset({"sent", "failed", "skipped", "digested", "suppressed"})


@dataclass(frozen=True, slots=True)
class EndpointRow:
    id: int
    user_id: str
    address: str
    secret: str | None


@dataclass(frozen=True, slots=True)
class RowState:
    status: str
    attempts: int
    lease_until: datetime | None
    now: datetime
    budget_base: int = 0  # attempts when last redriven: the budget counts the tries after it


_STATE_SQL = """
SELECT id, status, attempts, lease_until, now(), budget_base FROM deliveries WHERE id = ANY(%b)
"""

# A claim comes from a record read off the topic, so the row is published: it says so, as
# the publisher's mark skips a row a claim holds (storage/notifications.py).
_CLAIM_SQL = """
UPDATE deliveries d
SET status = 'sending', attempts = c.a + 1, lease_until = now() + make_interval(secs => %b),
    first_attempt_at = COALESCE(d.first_attempt_at, now()), last_attempt_at = now(), updated_at = now(),
    published_at = COALESCE(d.published_at, now())
FROM (SELECT * FROM unnest(%b::uuid[], %b::int[]) AS t(id, a) ORDER BY 1) AS c
WHERE d.id = c.id
  AND ((d.status IN ('queued', 'retrying') AND d.attempts = c.a)
       OR (d.status = 'sending' AND d.lease_until < now() AND d.attempts = c.a + 1))
RETURNING d.id
"""

# Gives a claim back (a send cancelled by a rebalance): the next owner claims it afresh.
_RELEASE_SQL = """
UPDATE deliveries d
SET status = CASE WHEN c.a = 0 THEN 'queued' ELSE 'retrying' END, attempts = c.a,
    lease_until = NULL, updated_at = now()
FROM (SELECT * FROM unnest(%b::uuid[], %b::int[]) AS t(id, a) ORDER BY 1) AS c
WHERE d.id = c.id AND d.status = 'sending' AND d.attempts = c.a + 1
"""

_ENDPOINTS_SQL = """
SELECT id, user_id, address, secret FROM channel_endpoints
WHERE user_id = ANY(%b) AND channel = %b AND disabled_at IS NULL ORDER BY id
"""

# Endpoints already done with a delivery: accepted it, refused it for good, or gone. A
# refusal from before a redrive (attempt <= budget_base) no longer counts: the operator
# redrove it because the endpoint was fixed. An acceptance always counts.
_SETTLED_SQL = """
SELECT a.delivery_id, a.endpoint_id, a.outcome
FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id
WHERE a.delivery_id = ANY(%b)
  AND (a.outcome = 'ok' OR (a.outcome <> 'transient' AND a.attempt > d.budget_base))
"""

_ATTEMPTS_SQL = """
INSERT INTO delivery_attempts (delivery_id, attempt, endpoint_id, outcome, status_code, error,
    provider_message_id, started_at, finished_at)
SELECT * FROM unnest(%b::uuid[], %b::int[], %b::bigint[], %b::text[], %b::int[], %b::text[],
    %b::text[], %b::timestamptz[], %b::timestamptz[]) AS t
ORDER BY 1, 2, 3
ON CONFLICT (delivery_id, attempt, endpoint_id) DO UPDATE SET
    outcome = excluded.outcome, status_code = excluded.status_code, error = excluded.error,
    provider_message_id = excluded.provider_message_id, started_at = excluded.started_at,
    finished_at = excluded.finished_at
"""

# Only a row still ours (claimed by this attempt) takes the outcome.
_FINISH_SQL = """
UPDATE deliveries d
SET status = f.status, status_reason = f.reason, last_error = f.error,
    provider_message_id = COALESCE(f.message_id, d.provider_message_id),
    sent_at = CASE WHEN f.delivered THEN COALESCE(d.sent_at, now()) ELSE d.sent_at END,
    lease_until = NULL, updated_at = now()
FROM (SELECT * FROM unnest(%b::uuid[], %b::int[], %b::text[], %b::text[], %b::text[], %b::text[],
      %b::bool[]) AS t(id, attempt, status, reason, error, message_id, delivered) ORDER BY 1) AS f
WHERE d.id = f.id AND d.status = 'sending' AND d.attempts = f.attempt
RETURNING d.id
"""

_DISABLE_SQL = """
UPDATE channel_endpoints SET disabled_at = now() WHERE id = ANY(%b) AND disabled_at IS NULL
"""


def states(cur: Cursor, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, RowState]:
    cur.execute(_STATE_SQL, (list(ids),))
    return {r[0]: RowState(r[1], r[2], r[3], r[4], r[5]) for r in cur.fetchall()}


def claim(cur: Cursor, items: Sequence[tuple[uuid.UUID, int]], lease_s: float) -> set[uuid.UUID]:
    """Claim (id, attempts-before) pairs; returns the ids this call now holds."""
    if not items:
        return set()
    cur.execute(_CLAIM_SQL, (lease_s, [i for i, _ in items], [a for _, a in items]))
    return {r[0] for r in cur.fetchall()}


def release(cur: Cursor, items: Sequence[tuple[uuid.UUID, int]]) -> None:
    if items:
        cur.execute(_RELEASE_SQL, ([i for i, _ in items], [a for _, a in items]))


def endpoints(cur: Cursor, user_ids: Sequence[str], channel: str) -> dict[str, list[EndpointRow]]:
    """The enabled endpoints of these users on ``channel``, per user."""
    out: dict[str, list[EndpointRow]] = {}
    if not user_ids:
        return out
    cur.execute(_ENDPOINTS_SQL, (sorted(set(user_ids)), channel))
    for eid, user_id, address, secret in cur.fetchall():
        out.setdefault(user_id, []).append(EndpointRow(eid, user_id, address, secret))
    return out


def settled(cur: Cursor, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, dict[int, str]]:
    """Per delivery: endpoint id → outcome, for endpoints no retry should send to again."""
    out: dict[uuid.UUID, dict[int, str]] = {}
    if not ids:
        return out
    cur.execute(_SETTLED_SQL, (list(ids),))
    for delivery_id, endpoint_id, outcome in cur.fetchall():
        out.setdefault(delivery_id, {})[endpoint_id] = outcome
    return out


@dataclass(frozen=True, slots=True)
class Attempt:
    delivery_id: uuid.UUID
    attempt: int
    endpoint_id: int
    outcome: str
    status_code: int | None
    error: str | None
    provider_message_id: str | None
    started_at: datetime
    finished_at: datetime


def record_attempts(cur: Cursor, attempts: Sequence[Attempt]) -> None:
    if not attempts:
        return
    cols = list(
        zip(
            *(
                (
                    a.delivery_id,
                    a.attempt,
                    a.endpoint_id,
                    a.outcome,
                    a.status_code,
                    a.error,
                    a.provider_message_id,
                    a.started_at,
                    a.finished_at,
                )
                for a in attempts
            ),
            strict=True,
        )
    )
    cur.execute(_ATTEMPTS_SQL, [list(c) for c in cols])


@dataclass(frozen=True, slots=True)
class Finish:
    id: uuid.UUID
    attempt: int
    status: str
    reason: str | None
    error: str | None
    provider_message_id: str | None
    delivered: bool  # some endpoint accepted it: sent_at is set


def finish(cur: Cursor, rows: Sequence[Finish]) -> set[uuid.UUID]:
    """Record outcomes; returns the ids updated (a row whose lease another consumer took is not)."""
    if not rows:
        return set()
    cur.execute(
        _FINISH_SQL,
        (
            [r.id for r in rows],
            [r.attempt for r in rows],
            [r.status for r in rows],
            [r.reason for r in rows],
            [r.error for r in rows],
            [r.provider_message_id for r in rows],
            [r.delivered for r in rows],
        ),
    )
    return {r[0] for r in cur.fetchall()}


def disable_endpoints(cur: Cursor, endpoint_ids: Sequence[int]) -> None:
    if endpoint_ids:
        cur.execute(_DISABLE_SQL, (sorted(set(endpoint_ids)),))
