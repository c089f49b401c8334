"""``herald api``: the in-app inbox, preferences and unsubscribe over HTTP (Starlette).

The app owns an async PostgreSQL pool, opened in its lifespan and closed on shutdown
(uvicorn runs the lifespan shutdown after SIGTERM, once requests in flight finished).
Each route is wrapped once (``_observed``): metrics by route name, and herald's errors
turned into problems (PostgreSQL away: 503; a value PostgreSQL refuses: 422), so every
answer, errors included, is RFC 9457 JSON and counted.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.auth import TokenVerifier
from api.openapi import document
from api.routes import Handlers
from config.settings import Settings
from core import metrics
from core.errors import DatabaseUnavailable, EnvironmentProblem, RecordRejected
from core.web import HttpProblem, healthz_route, problem, problem_handlers
from storage.pool import AsyncDatabase

Endpoint = Callable[[Request], Awaitable[Response]]


def _observed(name: str, endpoint: Endpoint) -> Endpoint:
    m = metrics.api()
    seconds = m.request_seconds.labels(name)

    async def handle(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await endpoint(request)
        except HttpProblem as exc:
            response = exc.response()
        except (DatabaseUnavailable, EnvironmentProblem):
            # Logged by the pool and PostgreSQL; the client may retry.
            response = problem(
                503,
                "Service Unavailable",
                "the database is unavailable; retry later",
                headers={"Retry-After": "1"},
            )
        except RecordRejected:
            response = problem(422, "Unprocessable Content", "PostgreSQL refused a value in this request")
        seconds.observe(time.perf_counter() - started)
        m.requests.labels(name, str(response.status_code)).inc()
        return response

    return handle


def create_app(settings: Settings, db: AsyncDatabase | None = None) -> Starlette:
    """The app; ``db`` defaults to a pool from settings, opened when the app starts."""
    verifier = TokenVerifier(settings.api)  # no key: ConfigError, before anything listens
    pool = db or AsyncDatabase.from_settings(settings)
    h = Handlers(settings, pool, verifier)
    spec = json.dumps(document(settings.api)).encode()

    async def openapi(_: Request) -> Response:
        return Response(spec, media_type="application/json")

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await pool.open()
        try:
            yield
        finally:
            await pool.close()

    routes = [
        Route("/v1/notifications", _observed("list", h.list_notifications), methods=["GET"]),
        Route("/v1/notifications/unread-count", _observed("unread_count", h.unread_count), methods=["GET"]),
        Route("/v1/notifications/read-all", _observed("read_all", h.read_all), methods=["POST"]),
        Route("/v1/notifications/{id}/read", _observed("read", h.mark_read), methods=["POST"]),
        Route("/v1/notifications/{id}/archive", _observed("archive", h.archive), methods=["POST"]),
        Route("/v1/preferences", _observed("preferences_get", h.get_preferences), methods=["GET"]),
        Route("/v1/preferences", _observed("preferences_put", h.put_preferences), methods=["PUT"]),
        Route("/v1/unsubscribe", _observed("unsubscribe", h.unsubscribe), methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        healthz_route(lambda: (not pool.closed, "ok" if not pool.closed else "database pool closed")),
    ]
    return Starlette(routes=routes, exception_handlers=problem_handlers(), lifespan=lifespan)
