"""The composition root of each long-running process: build collaborators, run the loop."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from channels.base import Provider
from config.settings import Settings
from consumers.decode import Decoder
from consumers.deliver import DeliverHandler
from consumers.digest import DigestHandler
from consumers.ingest import IngestHandler, Prepared
from consumers.loop import BatchLoop, RunStats, Stopper
from consumers.outbox import OutboxRelay
from consumers.rules import RuleSet
from core.errors import ConfigError
from core.http import Health, serve
from producers.publisher import KafkaPublisher
from producers.topics import Topics, ensure_topics
from storage.db import Database

log = logging.getLogger(__name__)

INGEST_GROUP = "herald-ingest"
DIGEST_GROUP = "herald-digest"
# Channels with a provider: `herald deliver --channel` takes these, `herald dev` runs one each.
PROVIDERS = ("email", "push", "webhook")


def deliver_group(channel: str) -> str:
    return f"herald-deliver-{channel}"


def build_provider(settings: Settings, channel: str) -> Provider:
    """The channel's provider; a ConfigError (one line) when its settings are missing."""
    if channel == "webhook":
        from channels.webhook import WebhookProvider

        return WebhookProvider(settings)
    if channel == "email":
        from channels.email import EmailProvider

        return EmailProvider(settings)
    if channel == "push":
        from channels.push import PushProvider

        return PushProvider(settings)
    raise ConfigError(f"no provider for channel {channel!r} yet: choose one of {', '.join(PROVIDERS)}")


def herald_command(*args: str) -> list[str]:
    """The argv of a child ``herald`` process (``herald dev``, the bench).

    ``-P``: the current folder never comes first on ``sys.path``, so a user's own
    ``config/`` or ``storage/`` package cannot shadow herald's.
    """
    return [sys.executable, "-P", "-m", "herald", *args]


def serve_metrics(stack: ExitStack, settings: Settings, health: Health) -> int | None:
    """/metrics and /healthz for the process, closed with ``stack``; returns the port (None
    when ``HERALD_METRICS_PORT`` is -1).

    Called before any connection: a busy port fails at once, not after the broker answers.
    """
    if settings.metrics_port < 0:
        return None
    server = serve(settings.metrics_host, settings.metrics_port, health)
    stack.callback(server.server_close)
    stack.callback(server.shutdown)
    return int(server.server_port)


def build_decoder(settings: Settings) -> Decoder:
    """Native, CloudEvents, and the rules file's rules when one is set (validated now)."""
    rules = RuleSet.load(settings.rules_file) if settings.rules_file is not None else None
    if rules is not None:
        log.info("mapping rules: %d from %s", len(rules), rules.origin)
    return Decoder(max_bytes=settings.max_event_bytes, rules=rules)


@dataclass
class IngestRun:
    stats: RunStats
    handler: IngestHandler


def run_ingest(
    settings: Settings,
    *,
    group: str = INGEST_GROUP,
    stopper: Stopper | None = None,
    max_messages: int | None = None,
    timeout: float | None = None,
    idle_timeout: float | None = None,
    on_commit: Callable[[Prepared, float], None] | None = None,
) -> IngestRun:
    """Build and run the ingest consumer until stopped (or a bound is reached)."""
    decoder = build_decoder(settings)  # an invalid rules file stops here, before any connection
    topics = Topics(settings.topic_prefix)
    health = Health()
    with ExitStack() as stack:
        serve_metrics(stack, settings, health)
        ensure_topics(settings, topics.ingest_topics())
        db = Database.from_settings(settings)
        stack.callback(db.close)
        publisher = KafkaPublisher(settings)
        stack.callback(publisher.close)
        # The outbox relay on its own connection and producer: it must never wait on a batch.
        relay_db = Database.from_settings(settings)
        stack.callback(relay_db.close)
        relay_publisher = KafkaPublisher(settings)
        stack.callback(relay_publisher.close)
        relay = OutboxRelay(settings, relay_db, relay_publisher, topics)
        relay.start()
        stack.callback(relay.stop)
        handler = IngestHandler(settings, db, publisher, topics, decoder, on_commit)
        loop = BatchLoop(
            settings,
            name="ingest",
            group=group,
            topics=[topics.events],
            handler=handler,
            stopper=stopper,
            health=health,
        )
        stats = loop.run(max_messages=max_messages, timeout=timeout, idle_timeout=idle_timeout)
        t = handler.totals
        log.info(
            "ingest stopped: %d records, %d inserted, %d duplicate, %d invalid",
            t.records,
            t.inserted,
            t.duplicates,
            t.invalid,
        )
    return IngestRun(stats, handler)


@dataclass
class DeliverRun:
    stats: RunStats
    loop: BatchLoop


def run_deliver(
    settings: Settings,
    channel: str,
    *,
    group: str | None = None,
    stopper: Stopper | None = None,
    max_messages: int | None = None,
    timeout: float | None = None,
    idle_timeout: float | None = None,
) -> DeliverRun:
    """Build and run one channel's deliverer: its main topic and its retry topics."""
    provider = build_provider(settings, channel)
    topics = Topics(settings.topic_prefix)
    tiers = settings.delivery.retry_tiers
    health = Health()
    with ExitStack() as stack:
        serve_metrics(stack, settings, health)
        reads = topics.channel_topics(channel, tiers)
        ensure_topics(settings, [*reads, topics.deliveries_dlq(channel)])
        db = Database.from_settings(settings)
        stack.callback(db.close)
        publisher = KafkaPublisher(settings)
        stack.callback(publisher.close)
        handler = DeliverHandler(settings, db, publisher, provider, topics=topics)
        stack.callback(handler.close)
        # A batch no bigger than the send slots: claims stay close behind the sends, so a
        # crash leaves few claimed rows waiting out their lease.
        batch_size = min(settings.batch_size, settings.delivery.concurrency)
        loop = BatchLoop(
            settings.model_copy(update={"batch_size": batch_size}),
            name=f"deliver-{channel}",
            group=group or deliver_group(channel),
            topics=reads,
            handler=handler,
            stopper=stopper,
            health=health,
        )
        log.info("deliver-%s: reading %s", channel, ", ".join(reads))
        stats = loop.run(max_messages=max_messages, timeout=timeout, idle_timeout=idle_timeout)
        log.info("deliver-%s stopped: %d records in %d batches", channel, stats.messages, stats.batches)
    return DeliverRun(stats, loop)


@dataclass
class DigestRun:
    stats: RunStats
    handler: DigestHandler


def run_digest(
    settings: Settings,
    *,
    group: str = DIGEST_GROUP,
    stopper: Stopper | None = None,
    max_messages: int | None = None,
    timeout: float | None = None,
    idle_timeout: float | None = None,
) -> DigestRun:
    """Build and run the digest process: windows fill from herald.digests.pending, the loop's
    tick closes them and publishes each digest to its channel's deliveries topic."""
    from config.settings import CHANNELS

    topics = Topics(settings.topic_prefix)
    health = Health()
    with ExitStack() as stack:
        serve_metrics(stack, settings, health)
        ensure_topics(settings, [topics.digests_pending, *(topics.deliveries(c) for c in CHANNELS)])
        db = Database.from_settings(settings)
        stack.callback(db.close)
        # The tick closes windows on the loop's thread while a batch applies on the worker's.
        close_db = Database.from_settings(settings)
        stack.callback(close_db.close)
        publisher = KafkaPublisher(settings)
        stack.callback(publisher.close)
        handler = DigestHandler(settings, db, close_db, publisher, topics)
        loop = BatchLoop(
            settings,
            name="digest",
            group=group,
            topics=[topics.digests_pending],
            handler=handler,
            stopper=stopper,
            health=health,
        )
        stats = loop.run(max_messages=max_messages, timeout=timeout, idle_timeout=idle_timeout)
        t = handler.totals
        log.info(
            "digest stopped: %d items added, %d duplicate; %d digests sent, %d suppressed",
            t.added,
            t.duplicates,
            t.sent,
            t.suppressed,
        )
    return DigestRun(stats, handler)


def herald_groups() -> list[str]:
    """The groups of herald's own consumers, watched by the lag exporter even before they exist
    (records waiting for a group that never started are a stopped group)."""
    return [INGEST_GROUP, *map(deliver_group, PROVIDERS), DIGEST_GROUP]


def run_lag_exporter(
    settings: Settings, *, stopper: Stopper | None = None, max_samples: int | None = None
) -> int:
    """Build and run ``herald lag-exporter``: the metrics port first (a busy port fails at
    once), then the first sample (an unreachable broker fails next); returns the samples taken."""
    from consumers.lag_exporter import LagExporter
    from consumers.offsets import Kafka
    from core import metrics

    cfg = settings.lag_exporter
    # Healthy while samples succeed: three missed intervals (and a slow broker's timeouts) is not.
    health = Health(stale_after=max(60.0, 3 * cfg.interval_s + 4 * cfg.timeout_s))
    with ExitStack() as stack:
        serve_metrics(stack, settings, health)
        kafka = stack.enter_context(Kafka(settings, cfg.timeout_s))
        exporter = LagExporter(settings, kafka, herald_groups(), metrics.lag_exporter(), health)
        taken = exporter.run(stopper or Stopper(), max_samples=max_samples)
        log.info("lag-exporter stopped after %d samples", taken)
    return taken


def run_api(settings: Settings) -> None:
    """Build and serve ``herald api`` until SIGTERM or SIGINT.

    In this order, so that each misconfiguration is a one-line error before anything serves:
    the token keys (``create_app``), the API port, the metrics port, then one connection to
    PostgreSQL; then uvicorn serves, and its lifespan opens the pool. On SIGTERM uvicorn stops
    accepting, lets requests in flight finish, and the lifespan closes the pool.
    """
    from api.app import create_app
    from core.web import bind, bound_port, server
    from storage.db import connect

    app = create_app(settings)
    sock = bind(settings.api.host, settings.api.port, "HERALD_API__PORT")
    with ExitStack() as stack:
        stack.callback(sock.close)
        # The API has no loop to beat; uvicorn answers.
        serve_metrics(stack, settings, Health(stale_after=float("inf")))
        connect(settings.database_url.get_secret_value()).close()
        log.info("herald api listening on http://%s:%d", settings.api.host, bound_port(sock))
        # uvicorn handles SIGTERM (graceful shutdown), then re-raises it to the handler it found:
        # a no-op one here, so a clean stop exits 0 like every other herald process.
        signal.signal(signal.SIGTERM, lambda *_: None)
        server(app, log_level=settings.log_level, on_shutdown=app.state.stop_streams).run(sockets=[sock])


class ReceiverRun:
    """``herald receiver`` as a context manager: ``serve()`` blocks until SIGTERM/SIGINT (or
    ``stop()`` from another thread). Start-up, in order, so each failure is one line:

    1. bind the receiver's port, then the metrics port (a busy port names its setting);
    2. create the events topic if missing (an unreachable broker fails here);
    3. the shared producer and its poll thread; the ASGI app.

    Shutdown: uvicorn stops accepting and lets requests in flight finish (each waits for
    its ack at most ``ack_timeout_s``); the app's lifespan flushes the producer; then the
    producer is closed and the ports released.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stack = ExitStack()
        self._server: Any = None
        self._sock: socket.socket | None = None
        self.port = 0
        self.metrics_port: int | None = None

    def __enter__(self) -> ReceiverRun:
        from core.web import bind, bound_port, server
        from producers.acks import AckingProducer, BrokerHealth
        from producers.receiver import Receiver

        cfg = self.settings.receiver
        try:
            self._sock = bind(cfg.host, cfg.port, "HERALD_RECEIVER__PORT")
            self._stack.callback(self._sock.close)
            self.port = bound_port(self._sock)
            topics = Topics(self.settings.topic_prefix)
            probe_timeout = min(cfg.ack_timeout_s, 5.0)
            health = BrokerHealth(stale_after=probe_timeout + 2.0)
            self.metrics_port = serve_metrics(self._stack, self.settings, health)
            # Before the producer: its health probe asks for the topic's metadata, and a broker
            # that creates topics on demand would otherwise create it with its own defaults.
            ensure_topics(self.settings, [topics.events], timeout=max(5.0, 3 * cfg.ack_timeout_s))
            producer = AckingProducer(
                self.settings,
                probe_topic=topics.events,
                probe_timeout_s=probe_timeout,
                health=health,
                **{"linger.ms": cfg.linger_ms},
            )
            self._stack.callback(producer.close, cfg.shutdown_timeout_s)
            receiver = Receiver(cfg, producer, topics.events)
            self._server = server(
                receiver.app, log_level=self.settings.log_level, graceful_s=cfg.shutdown_timeout_s
            )
        except BaseException:
            self._stack.close()
            raise
        if not cfg.sources:
            log.warning("receiver: no sources configured (HERALD_RECEIVER__SOURCES): every request gets 404")
        log.info("receiver listening on %s (sources: %s)", self.url, ", ".join(sorted(cfg.sources)) or "none")
        return self

    @property
    def url(self) -> str:
        host = self.settings.receiver.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def serve(self) -> None:
        assert self._server is not None and self._sock is not None
        self._server.run(sockets=[self._sock])

    def stop(self) -> None:
        """Like SIGTERM, from another thread."""
        if self._server is not None:
            self._server.should_exit = True

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def run_receiver(settings: Settings) -> None:
    """Build and serve the webhook receiver until SIGTERM or SIGINT."""
    with ReceiverRun(settings) as run:
        run.serve()
