"""Every metric in one place, with low-cardinality labels (never a user id)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INGEST_EVENTS = Counter(
    "herald_ingest_events",
    "Notifications by ingest outcome: inserted, duplicate, invalid, rate_limited, hidden.",
    ["outcome"],
)
INGEST_BATCH_SECONDS = Histogram(
    "herald_ingest_batch_seconds",
    "Wall time of one ingest batch, from poll to offset commit.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RECORDS_PUBLISHED = Counter(
    "herald_records_published",
    "Records acknowledged by the broker, by topic kind (delivery, digest, dlq).",
    ["kind", "channel"],
)
INGEST_CONTENT_KEYS = Counter(
    "herald_ingest_content_keys",
    "Mapped records with no id at all, deduplicated by the SHA-256 of their value.",
)
DLQ_RECORDS = Counter(
    "herald_dlq_records",
    "Records sent to a dead-letter topic, by reason.",
    ["topic_kind", "reason"],
)
DB_UNAVAILABLE = Counter(
    "herald_db_unavailable",
    "Batch retries because PostgreSQL was unreachable.",
    ["process"],
)
BROKER_UNAVAILABLE = Counter(
    "herald_broker_unavailable",
    "Batch retries because the broker did not acknowledge their records.",
    ["process"],
)
ASSIGNMENT_LOST = Counter(
    "herald_assignment_lost",
    "Batches dropped uncommitted because the group rebalanced under them.",
    ["process"],
)
CONSUMER_LAG = Gauge(
    "herald_consumer_lag",
    "Records not yet committed by the group, per topic.",
    ["group", "topic"],
)

OUTCOMES = ("inserted", "duplicate", "invalid", "rate_limited", "hidden")
for _outcome in OUTCOMES:
    INGEST_EVENTS.labels(_outcome)
