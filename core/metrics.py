"""Every metric in one module, grouped by the process that owns it.

Prometheus conventions: a ``herald_`` prefix, base units, ``_total`` on counters
(prometheus-client adds it), low-cardinality labels only (never a user id).

A group is registered in the process-wide registry the first time its process
asks for it (``loop()``, ``ingest()``), never at import: ``herald api`` does not
export ingest counters it never moves. Each group is a frozen dataclass of
collectors, so a reader sees every metric a process exports in one place.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

INGEST_OUTCOMES = ("inserted", "duplicate", "invalid", "rate_limited", "hidden")


# Latency of a whole trip, event to provider: seconds for a live event, hours after an
# outage or a replay of old records.
TRIP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0)
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class LoopMetrics:
    """The batch loop's, in every consumer process (label ``consumer``: ingest, deliver-webhook,
    digest, ...). ``topic`` is a topic herald reads, never a record's content."""

    records_consumed: Counter
    records_processed: Counter
    records_failed: Counter
    dlq_records: Counter
    batch_seconds: Histogram
    commit_seconds: Histogram
    db_unavailable: Counter
    environment_errors: Counter
    broker_unavailable: Counter
    assignment_lost: Counter


@cache
def loop() -> LoopMetrics:
    return LoopMetrics(
        records_consumed=Counter(
            "herald_records_consumed",
            "Records polled, by consumer and topic (a record polled again after a rewind or a "
            "deferral counts again).",
            ["consumer", "topic"],
        ),
        records_processed=Counter(
            "herald_records_processed",
            "Records whose batch was made durable and whose offsets were committed.",
            ["consumer", "topic"],
        ),
        records_failed=Counter(
            "herald_records_failed",
            "Records the consumer could not process, sent to a dead-letter topic (by the topic "
            "they were read from).",
            ["consumer", "topic"],
        ),
        dlq_records=Counter(
            "herald_dlq_records",
            "Records produced to a dead-letter topic and acknowledged, by that topic and reason "
            "(herald-dlt-reason: not_json, schema, permanent, exhausted, ...).",
            ["topic", "reason"],
        ),
        batch_seconds=Histogram(
            "herald_batch_seconds",
            "Wall time of one batch, from its poll to its offset commit (retries in hand included).",
            ["consumer"],
            buckets=BATCH_BUCKETS,
        ),
        commit_seconds=Histogram(
            "herald_commit_seconds",
            "Wall time of one synchronous offset commit.",
            ["consumer"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        ),
        db_unavailable=Counter(
            "herald_db_unavailable",
            "Batch retries because PostgreSQL was unreachable or busy.",
            ["consumer"],
        ),
        environment_errors=Counter(
            "herald_environment_errors",
            "Batch retries because the database or broker is set up wrongly (missing table, "
            "privileges, read-only, unknown topic): an operator must act. Label system: database|broker.",
            ["consumer", "system"],
        ),
        broker_unavailable=Counter(
            "herald_broker_unavailable",
            "Batch retries because the broker did not acknowledge their records.",
            ["consumer"],
        ),
        assignment_lost=Counter(
            "herald_assignment_lost",
            "Batches dropped uncommitted because the group rebalanced under them.",
            ["consumer"],
        ),
    )


@dataclass(frozen=True)
class IngestMetrics:
    """``herald ingest``'s own."""

    events: Counter
    records_published: Counter
    content_keys: Counter
    outbox_relayed: Counter


@cache
def ingest() -> IngestMetrics:
    m = IngestMetrics(
        events=Counter(
            "herald_ingest_events",
            "Notifications by ingest outcome: inserted, duplicate, invalid, rate_limited, hidden.",
            ["outcome"],
        ),
        records_published=Counter(
            "herald_records_published",
            "Records acknowledged by the broker, by topic kind (delivery, digest); dead letters are "
            "herald_dlq_records_total.",
            ["kind", "channel"],
        ),
        content_keys=Counter(
            "herald_ingest_content_keys",
            "Mapped records with no id at all, deduplicated by the SHA-256 of their value.",
        ),
        outbox_relayed=Counter(
            "herald_outbox_relayed",
            "Delivery rows left unpublished past the relay's age limit, then published by the relay.",
        ),
    )
    for outcome in INGEST_OUTCOMES:
        m.events.labels(outcome)
    return m


@dataclass(frozen=True)
class DeliverMetrics:
    """``herald deliver --channel C``'s own (label ``channel``)."""

    sends: Counter
    send_seconds: Histogram
    responses: Counter
    latency: Histogram
    outcomes: Counter
    skipped: Counter
    retried: Counter
    dead_letters: Counter
    deferred: Counter
    endpoints_disabled: Counter
    in_flight: Gauge
    held: Counter
    circuits: Gauge
    circuit_changes: Counter
    abandoned: Counter


@cache
def deliver() -> DeliverMetrics:
    return DeliverMetrics(
        sends=Counter(
            "herald_deliver_sends",
            "Sends to one endpoint, by outcome: ok, transient, permanent, gone.",
            ["channel", "outcome"],
        ),
        send_seconds=Histogram(
            "herald_deliver_send_seconds",
            "Wall time of one send to one endpoint, answer or timeout included.",
            ["channel"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        ),
        responses=Counter(
            "herald_deliver_responses",
            "Provider answers by status class: 2xx, 3xx, 4xx, 5xx (HTTP status or SMTP reply "
            "code), none (no answer: timeout, connection refused, a refused target).",
            ["channel", "status_class"],
        ),
        latency=Histogram(
            "herald_delivery_latency_seconds",
            "End to end: from the event's record timestamp on the events topic to the provider "
            "accepting the delivery, by severity (digest: from the window's close).",
            ["channel", "severity"],
            buckets=TRIP_BUCKETS,
        ),
        outcomes=Counter(
            "herald_deliver_outcomes",
            "Deliveries handled, by what became of them: sent, retry (to a retry topic), dlq "
            "(failed, to the dead-letter topic), skipped (nothing to send: no endpoint, opted out).",
            ["channel", "outcome"],
        ),
        skipped=Counter(
            "herald_deliver_skipped",
            "Delivery records not sent because their row is final (sent, failed, skipped, ...) or "
            "because a later stage of the delivery exists (stale): duplicates after a crash or replay.",
            ["channel", "reason"],
        ),
        retried=Counter(
            "herald_deliver_retried",
            "Deliveries sent to a retry topic, by tier.",
            ["channel", "tier"],
        ),
        dead_letters=Counter(
            "herald_deliver_dead_letters",
            "Deliveries sent to the channel's dead-letter topic, by reason: "
            "permanent, exhausted, endpoint_gone.",
            ["channel", "reason"],
        ),
        deferred=Counter(
            "herald_deliver_deferred",
            "Partitions paused because their head record is not due yet (due) or its delivery is "
            "held by another consumer's lease (leased).",
            ["channel", "why"],
        ),
        endpoints_disabled=Counter(
            "herald_deliver_endpoints_disabled",
            "Endpoints disabled because they answered 410 Gone.",
            ["channel"],
        ),
        in_flight=Gauge(
            "herald_deliver_in_flight",
            "Deliveries claimed and not yet recorded (sending, or waiting for a send slot).",
            ["channel"],
        ),
        held=Counter(
            "herald_deliver_held",
            "Deliveries held back, no attempt spent, because their host's circuit is open "
            "(they wait on a retry topic until it may be tried again).",
            ["channel"],
        ),
        circuits=Gauge(
            "herald_deliver_circuits",
            "Target hosts per circuit-breaker state: closed, open, half_open.",
            ["channel", "state"],
        ),
        circuit_changes=Counter(
            "herald_deliver_circuit_changes",
            "Circuit-breaker state changes, by the state entered.",
            ["channel", "state"],
        ),
        abandoned=Counter(
            "herald_deliver_abandoned",
            "Sends given up unfinished by a rebalance or a shutdown past its grace "
            "(the claim is given back; the next owner sends again).",
            ["channel"],
        ),
    )


API_ROUTES = (
    "list",
    "unread_count",
    "read",
    "read_all",
    "archive",
    "preferences_get",
    "preferences_put",
    "unsubscribe",
    "stream_token",
    "stream",
    "endpoints_list",
    "endpoints_add",
    "endpoints_remove",
)


@dataclass(frozen=True)
class ApiMetrics:
    """``herald api``'s own. Routes are the handlers' names, never paths (paths hold ids)."""

    requests: Counter
    request_seconds: Histogram
    auth_failures: Counter


@cache
def api() -> ApiMetrics:
    m = ApiMetrics(
        requests=Counter(
            "herald_api_requests",
            "API requests answered, by route and status code.",
            ["route", "status"],
        ),
        request_seconds=Histogram(
            "herald_api_request_seconds",
            "Time to answer an API request, by route (from routing to the response object).",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        ),
        auth_failures=Counter(
            "herald_api_auth_failures",
            "Requests refused with 401, by reason: missing, malformed, expired, audience, issuer, "
            "algorithm, signature, claims.",
            ["reason"],
        ),
    )
    for route in API_ROUTES:
        m.request_seconds.labels(route)
    return m


@dataclass(frozen=True)
class StreamMetrics:
    """``herald api``'s live stream (``GET /v1/stream``)."""

    clients: Gauge
    dropped: Counter
    events: Counter


@cache
def stream() -> StreamMetrics:
    m = StreamMetrics(
        clients=Gauge("herald_stream_clients", "Open event streams in this process."),
        dropped=Counter(
            "herald_stream_dropped",
            "Streams the server ended, by reason: slow (its queue overflowed; it reconnects "
            "with Last-Event-ID), shutdown.",
            ["reason"],
        ),
        events=Counter(
            "herald_stream_events",
            "Events sent to streams, by event: notification, unread, reset.",
            ["event"],
        ),
    )
    for reason in ("slow", "shutdown"):
        m.dropped.labels(reason)
    return m


RECEIVER_OUTCOMES = (
    "accepted",
    "unauthorized",
    "too_large",
    "unsupported_media_type",
    "unknown_source",
    "unavailable",
)


@dataclass(frozen=True)
class ReceiverMetrics:
    """``herald receiver``'s own. ``source`` is a configured source name, or ``unknown``
    for a path that names none (never the name a stranger put in the URL)."""

    requests: Counter
    request_seconds: Histogram
    queue_depth: Gauge


@cache
def receiver() -> ReceiverMetrics:
    return ReceiverMetrics(
        requests=Counter(
            "herald_receiver_requests",
            "Webhook requests by source and outcome: accepted (202 after the broker's ack), "
            "unauthorized, too_large, unsupported_media_type, unknown_source, "
            "unavailable (503).",
            ["source", "outcome"],
        ),
        request_seconds=Histogram(
            "herald_receiver_request_seconds",
            "Wall time of one webhook request, from its first byte read to the answer, by source.",
            ["source"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        ),
        queue_depth=Gauge(
            "herald_receiver_producer_queue",
            "Records handed to the producer and not yet acknowledged by the broker.",
        ),
    )


@dataclass(frozen=True)
class DigestMetrics:
    """``herald digest``'s own (label ``channel``)."""

    items: Counter
    open_windows: Gauge
    items_per_digest: Histogram
    digests: Counter
    close_lag: Histogram
    republished: Counter


@cache
def digest() -> DigestMetrics:
    m = DigestMetrics(
        items=Counter(
            "herald_digest_items",
            "Digest items read from herald.digests.pending, by outcome: added, duplicate (replayed).",
            ["outcome"],
        ),
        open_windows=Gauge(
            "herald_digest_open_windows",
            "Digest windows still open (all processes: read from PostgreSQL on each tick).",
        ),
        items_per_digest=Histogram(
            "herald_digest_items_per_digest",
            "Items in each digest sent (read items left out).",
            ["channel"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
        ),
        digests=Counter(
            "herald_digests",
            "Windows closed, by outcome: sent (a digest delivery), suppressed (every item was read).",
            ["channel", "outcome"],
        ),
        close_lag=Histogram(
            "herald_digest_close_lag_seconds",
            "How long after its closing time (end + grace, or reaching max items) a window closed.",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
        ),
        republished=Counter(
            "herald_digest_republished",
            "Digest records published again by the relay (a crash fell between commit and publish).",
        ),
    )
    for outcome in ("added", "duplicate"):
        m.items.labels(outcome)
    return m


GROUP_STATUSES = ("ok", "stalled", "stopped")


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One sampled partition, as the lag collector exports it."""

    group: str
    topic: str
    partition: int
    records: int
    seconds: float


class LagCollector(Collector):
    """The last lag sample, served as it was taken: a scrape makes no broker call, and a
    partition or group that is gone from the sample is gone from /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[PartitionLag] = []
        self._statuses: dict[str, str] = {}

    def update(self, rows: list[PartitionLag], statuses: dict[str, str]) -> None:
        with self._lock:
            self._rows, self._statuses = list(rows), dict(statuses)

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        labels = ["group", "topic", "partition"]
        return (
            GaugeMetricFamily(
                "herald_consumer_lag_records",
                "Records between the group's committed offset and the partition's end (0 when caught up).",
                labels=labels,
            ),
            GaugeMetricFamily(
                "herald_consumer_lag_seconds",
                "Age of the oldest unconsumed record, from its timestamp (from its due time on a retry "
                "topic); 0 when caught up or when only not-yet-due retry records wait.",
                labels=labels,
            ),
            GaugeMetricFamily(
                "herald_consumer_group_status",
                "1 for the group's status, judged from samples of committed offsets: ok; stalled (active, "
                "due records wait, the committed offset does not move); stopped (no active member while "
                "due records wait).",
                labels=["group", "status"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        records, seconds, status = self._families()
        with self._lock:
            rows, statuses = self._rows, self._statuses
        for r in rows:
            key = [r.group, r.topic, str(r.partition)]
            records.add_metric(key, r.records)
            seconds.add_metric(key, r.seconds)
        for group, current in sorted(statuses.items()):
            for name in GROUP_STATUSES:
                status.add_metric([group, name], 1.0 if name == current else 0.0)
        yield from (records, seconds, status)


@dataclass(frozen=True)
class LagExporterMetrics:
    """``herald lag-exporter``'s own: the lag families (one collector) and its health."""

    lag: LagCollector
    last_success: Gauge
    sample_seconds: Histogram
    errors: Counter


@cache
def lag_exporter() -> LagExporterMetrics:
    collector = LagCollector()
    REGISTRY.register(collector)
    return LagExporterMetrics(
        lag=collector,
        last_success=Gauge(
            "herald_lag_exporter_last_success_timestamp_seconds",
            "Unix time of the last complete sample of the broker (lag figures are as old as this).",
        ),
        sample_seconds=Histogram(
            "herald_lag_exporter_sample_seconds",
            "Wall time of one sample: offsets, watermarks, group states and head records.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        ),
        errors=Counter(
            "herald_lag_exporter_errors",
            "Samples that failed (the broker unreachable or too slow); the last good one is kept.",
        ),
    )
