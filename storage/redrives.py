"""What ``herald redrive`` moved, by DLQ topic, partition and offset; and the delivery reset.

Order for each chunk of dead letters (consumers/redrive.py):

1. ``take``: one transaction writes a ``pending`` row per record and puts each failed
   delivery back to ``queued`` (its budget restarting at its current attempts), so the
   record's claim matches the row;
2. the records are produced and acknowledged;
3. ``mark``: the rows become ``moved``.

A row already present (any status) is never taken again; a ``pending`` row left by a
crash between 2 and 3 is resolved by looking for the record on its target topic first.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

Cursor = psycopg.Cursor[tuple[Any, ...]]

_DONE_SQL = """
SELECT dlq_partition, dlq_offset, status, target_topic, taken_at FROM redrives WHERE dlq_topic = %s
"""

_TAKE_SQL = """
INSERT INTO redrives (dlq_topic, dlq_partition, dlq_offset, target_topic, reason, delivery_id, status)
SELECT %s, * FROM unnest(%b::int[], %b::bigint[], %b::text[], %b::text[], %b::uuid[], %b::text[])
ORDER BY 1, 2
ON CONFLICT DO NOTHING
RETURNING dlq_partition, dlq_offset
"""

# A failed delivery goes back to 'queued' with its history; its budget restarts here.
_RESET_SQL = """
UPDATE deliveries SET status = 'queued', status_reason = NULL, lease_until = NULL,
    budget_base = attempts, updated_at = now()
WHERE id = ANY(%b) AND status = 'failed'
"""

_STATUS_SQL = "SELECT id, status, attempts FROM deliveries WHERE id = ANY(%b)"

_MARK_SQL = """
UPDATE redrives SET status = %s, moved_at = now()
WHERE dlq_topic = %s AND status = 'pending'
  AND (dlq_partition, dlq_offset) IN (SELECT * FROM unnest(%b::int[], %b::bigint[]))
"""


# One redrive per DLQ topic at a time: a session lock, held until the connection closes.
_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended('herald-redrive:' || %s, 0))"


def lock(cur: Cursor, dlq_topic: str) -> bool:
    """Take the DLQ topic's redrive lock for this session; False when another session has it."""
    row = cur.execute(_LOCK_SQL, (dlq_topic,)).fetchone()
    return bool(row and row[0])


@dataclass(frozen=True, slots=True)
class Taken:
    partition: int
    offset: int
    target_topic: str
    reason: str | None
    delivery_id: uuid.UUID | None
    status: str  # pending or already_sent


@dataclass(frozen=True, slots=True)
class Done:
    status: str
    target_topic: str
    taken_at_ms: int


def done(cur: Cursor, dlq_topic: str) -> dict[tuple[int, int], Done]:
    """Every record of ``dlq_topic`` a redrive took: (partition, offset) -> its row."""
    cur.execute(_DONE_SQL, (dlq_topic,))
    return {
        (p, o): Done(status, target, int(taken.timestamp() * 1000))
        for p, o, status, target, taken in cur.fetchall()
    }


def delivery_states(cur: Cursor, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[str, int]]:
    """id -> (status, attempts) of these deliveries."""
    if not ids:
        return {}
    cur.execute(_STATUS_SQL, (list(ids),))
    return {r[0]: (r[1], r[2]) for r in cur.fetchall()}


def take(cur: Cursor, dlq_topic: str, rows: Sequence[Taken]) -> set[tuple[int, int]]:
    """Record these as taken and reset their failed deliveries; returns the (partition,
    offset) pairs this call took (a concurrent redrive that took one first keeps it)."""
    if not rows:
        return set()
    cur.execute(
        _TAKE_SQL,
        (
            dlq_topic,
            [r.partition for r in rows],
            [r.offset for r in rows],
            [r.target_topic for r in rows],
            [r.reason for r in rows],
            [r.delivery_id for r in rows],
            [r.status for r in rows],
        ),
    )
    taken = {(p, o) for p, o in cur.fetchall()}
    reset = [
        r.delivery_id
        for r in rows
        if r.delivery_id and r.status == "pending" and (r.partition, r.offset) in taken
    ]
    if reset:
        cur.execute(_RESET_SQL, (reset,))
    return taken


def mark(cur: Cursor, dlq_topic: str, positions: Sequence[tuple[int, int]], status: str = "moved") -> None:
    """Pending rows become ``moved`` (the broker has the record) or ``already_sent``."""
    if positions:
        cur.execute(_MARK_SQL, (status, dlq_topic, [p for p, _ in positions], [o for _, o in positions]))
