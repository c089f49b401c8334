"""``herald receiver``: signed webhooks over HTTP in, one record each on herald.events out.

``POST /webhooks/{source}``, in this order:

1. an unknown source is a 404 (nothing read);
2. a content type other than JSON (``application/json`` or ``application/*+json``) is a 415;
3. a body over ``max_body_bytes`` (from Content-Length, or while reading) is a 413;
4. the source's scheme verifies the raw bytes: a 401 names the reason in the log, never
   the body or a secret;
5. the raw body goes to the events topic, keyed ``<source>:<event id>``, with the headers
   the source needs downstream and ``herald-source``;
6. **202 only once the broker has acknowledged that record**; no ack within
   ``ack_timeout_s`` (or a broker error) is a 503 with ``Retry-After``, so the sender
   retries. A duplicate is accepted again: ingest deduplicates.

On shutdown (SIGTERM) uvicorn stops accepting, lets requests in flight finish, and the
lifespan flushes the producer before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from config.settings import ReceiverSettings, SourceSettings
from core import metrics
from core.errors import BrokerMisconfigured, HeraldError
from core.web import healthz_route, problem
from producers.acks import AckingProducer
from producers.publisher import Headers, OutRecord
from producers.signatures import Scheme, SignatureError, scheme_for

log = logging.getLogger(__name__)

SOURCE_HEADER = "herald-source"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Source:
    name: str
    scheme: Scheme
    # (header name as forwarded, lower-case name to look up)
    forward: tuple[tuple[str, str], ...]


def source(name: str, cfg: SourceSettings) -> Source:
    scheme = scheme_for(cfg)
    return Source(name, scheme, tuple((h, h.lower()) for h in scheme.forward))


class TooLarge(Exception):
    pass


def is_json(content_type: str | None) -> bool:
    """``application/json`` or a JSON-based type (``application/cloudevents+json``), any parameters."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def record_headers(source: Source, headers: Mapping[str, str], content_type: str) -> Headers:
    """``herald-source``, the content type (ingest reads structured CloudEvents by it), the
    scheme's and the source's forwarded headers, and HTTP-binding CloudEvents attributes
    (``ce-id``) renamed for the Kafka binding (``ce_id``)."""
    out: Headers = [(SOURCE_HEADER, source.name.encode()), ("content-type", content_type.encode())]
    for name, lower in source.forward:
        value = headers.get(lower)
        if value is not None:
            out.append((name, value.encode("latin-1", "replace")))
    for name, value in headers.items():
        if name.startswith("ce-"):
            out.append(("ce_" + name[3:], value.encode("latin-1", "replace")))
    return out


def record_key(source: str, event_id: str | None, body: bytes) -> bytes:
    """``<source>:<event id>``; without an id, the body's SHA-256, so a retried request lands
    on the same partition as its first copy."""
    if event_id:
        return f"{source}:{event_id}".encode()
    return f"{source}:sha256:{hashlib.sha256(body).hexdigest()}".encode()


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class Receiver:
    """The ASGI app and what it needs: sources, the shared producer, the topic."""

    def __init__(self, settings: ReceiverSettings, producer: AckingProducer, topic: str) -> None:
        self._settings = settings
        self._producer = producer
        self._topic = topic
        self._sources = {name: source(name, cfg) for name, cfg in settings.sources.items()}
        self._metrics = metrics.receiver()
        for name in (*self._sources, UNKNOWN):
            for outcome in metrics.RECEIVER_OUTCOMES:
                self._metrics.requests.labels(name, outcome)
        self._metrics.queue_depth.set_function(lambda: len(producer))
        self._retry_after = {"Retry-After": str(settings.retry_after_s)}
        self.app = Starlette(
            routes=[
                Route("/webhooks/{source}", self.webhook, methods=["POST"]),
                healthz_route(producer.health),
            ],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        # Requests in flight have finished (or timed out): wait for any record still queued.
        loop = asyncio.get_running_loop()
        left = await loop.run_in_executor(None, self._producer.flush, self._settings.shutdown_timeout_s)
        if left:
            log.error("receiver: %d record(s) unacknowledged at shutdown", left)

    async def webhook(self, request: Request) -> Response:
        started = time.perf_counter()
        source = self._sources.get(request.path_params["source"])
        label = source.name if source is not None else UNKNOWN
        response: Response
        if source is None:
            response = problem(404, "Unknown source", "no source of that name is configured")
            outcome = "unknown_source"
        else:
            response, outcome = await self._handle(source, request)
        self._metrics.requests.labels(label, outcome).inc()
        self._metrics.request_seconds.labels(label).observe(time.perf_counter() - started)
        return response

    async def _handle(self, source: Source, request: Request) -> tuple[Response, str]:
        headers = request.headers
        content_type = headers.get("content-type")
        if not is_json(content_type):
            return problem(415, "Unsupported media type", "send application/json"), "unsupported_media_type"
        assert content_type is not None
        limit = self._settings.max_body_bytes
        try:
            body = await read_body(request, limit)
        except TooLarge:
            return problem(413, "Content too large", f"the limit is {limit} bytes"), "too_large"
        try:
            source.scheme.verify(body, headers)
        except SignatureError as exc:
            log.info("receiver: source %s: 401: %s", source.name, exc.reason)
            return problem(401, "Unauthorized", exc.reason), "unauthorized"
        rec = OutRecord(
            topic=self._topic,
            value=body,
            key=record_key(source.name, source.scheme.event_id(body, headers), body),
            headers=record_headers(source, headers, content_type),
        )
        return await self._publish(source, rec)

    async def _publish(self, source: Source, rec: OutRecord) -> tuple[Response, str]:
        try:
            topic, partition, offset = await self._producer.publish(rec, self._settings.ack_timeout_s)
        except TimeoutError:
            log.warning(
                "receiver: source %s: 503: no broker ack in %.1fs", source.name, self._settings.ack_timeout_s
            )
            return self._unavailable("the broker did not acknowledge in time"), "unavailable"
        except HeraldError as exc:
            level = logging.ERROR if isinstance(exc, BrokerMisconfigured) else logging.WARNING
            log.log(level, "receiver: source %s: 503: %s", source.name, exc)
            return self._unavailable("the broker did not take the event"), "unavailable"
        body = json.dumps({"status": "accepted", "topic": topic, "partition": partition, "offset": offset})
        return Response(body, status_code=202, media_type="application/json"), "accepted"

    def _unavailable(self, detail: str) -> Response:
        return problem(503, "Service unavailable", f"{detail}: retry later", headers=self._retry_after)
