"""The composition root of each long-running process: build collaborators, run the loop."""

from __future__ import annotations

import logging
import socket
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from config.settings import Settings
from consumers.decode import Decoder
from consumers.ingest import IngestHandler
from consumers.loop import BatchLoop, RunStats, Stopper
from consumers.outbox import OutboxRelay
from consumers.rules import RuleSet
from core.http import Health, serve
from producers.publisher import KafkaPublisher
from producers.topics import Topics, ensure_topics
from storage.db import Database

log = logging.getLogger(__name__)

INGEST_GROUP = "herald-ingest"


def herald_command(*args: str) -> list[str]:
    """The argv of a child ``herald`` process (``herald dev``, the bench).

    ``-P``: the current folder never comes first on ``sys.path``, so a user's own
    ``config/`` or ``storage/`` package cannot shadow herald's.
    """
    return [sys.executable, "-P", "-m", "herald", *args]


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
) -> IngestRun:
    """Build and run the ingest consumer until stopped (or a bound is reached)."""
    decoder = build_decoder(settings)  # an invalid rules file stops here, before any connection
    topics = Topics(settings.topic_prefix)
    health = Health()
    with ExitStack() as stack:
        if settings.metrics_port >= 0:
            # Before any connection: a busy port fails at once, not after the broker answers.
            server = serve(settings.metrics_host, settings.metrics_port, health)
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
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
        handler = IngestHandler(settings, db, publisher, topics, decoder)
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
            if self.settings.metrics_port >= 0:
                metrics_server = serve(self.settings.metrics_host, self.settings.metrics_port, health)
                self.metrics_port = int(metrics_server.server_port)
                self._stack.callback(metrics_server.server_close)
                self._stack.callback(metrics_server.shutdown)
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
