"""``herald api``: the in-app inbox, preferences and unsubscribe over HTTP (Starlette).

The app owns an async PostgreSQL pool, opened in its lifespan and closed on shutdown
(uvicorn runs the lifespan shutdown after SIGTERM, once requests in flight finished).
Each route is wrapped once (``_observed``): metrics by route name, and herald's errors
turned into problems (PostgreSQL away: 503; a value PostgreSQL refuses: 422), so every
answer, errors included, is RFC 9457 JSON and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.auth import StreamTokens, TokenVerifier
from api.openapi import document
from api.routes import Handlers
from api.stream import Hub
from config.settings import Settings
from core import metrics
from core.errors import DatabaseUnavailable, EnvironmentProblem, RecordRejected
from core.web import HttpProblem, healthz_route, problem, problem_handlers
from storage.db import session_options
from storage.pool import AsyncDatabase
from storage.stream import Listener

log = logging.getLogger(__name__)

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


# The notification center page: scripts and styles only from this server (no inline script,
# no CDN), no frames, no forms, no plugins; it talks to this origin alone.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_STATIC = {"center.js": "text/javascript", "center.css": "text/css"}


def _page_routes(app_url: str | None) -> list[Route]:
    """``/`` and its two files, read once from the package (api/static). The page resolves
    relative links against the product's app (``HERALD_APP_URL``)."""
    folder = resources.files("api").joinpath("static")
    files = {name: folder.joinpath(name).read_bytes() for name in ("center.html", *_STATIC)}
    files["center.html"] = files["center.html"].replace(b"{{APP_URL}}", html.escape(app_url or "").encode())

    async def page(_: Request) -> Response:
        return Response(files["center.html"], media_type="text/html", headers=_PAGE_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return problem(404, "Not Found")
        return Response(files[name], media_type=_STATIC[name], headers=_PAGE_HEADERS)

    return [Route("/", page, methods=["GET"]), Route("/static/{name}", static, methods=["GET"])]


def create_app(settings: Settings, db: AsyncDatabase | None = None) -> Starlette:
    """The app; ``db`` defaults to a pool from settings, opened when the app starts.

    ``app.state.stop_streams()`` ends every open event stream: call it when the server begins
    to shut down (``core.web.server(on_shutdown=...)``), or uvicorn waits for them."""
    verifier = TokenVerifier(settings.api)  # no key: ConfigError, before anything listens
    pool = db or AsyncDatabase.from_settings(settings)
    hub = Hub(settings.api.stream_queue_size)
    h = Handlers(settings, pool, verifier, hub, StreamTokens(settings.api))
    spec = json.dumps(document(settings.api)).encode()
    listener = Listener(
        settings.database_url.get_secret_value(),
        hub.publish,
        hub.wake_all,
        options=session_options(
            statement_timeout_ms=settings.db_statement_timeout_ms,
            idle_in_transaction_timeout_ms=settings.db_idle_in_transaction_timeout_ms,
            keepalives_idle_s=settings.db_keepalives_idle_s,
        ),
    )

    async def openapi(_: Request) -> Response:
        return Response(spec, media_type="application/json")

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await pool.open()
        listening = asyncio.create_task(listener.run(), name="stream-listener")
        try:
            try:
                await asyncio.wait_for(listener.listening.wait(), 10)
            except TimeoutError:
                log.warning("stream: not listening yet; live updates start once it connects")
            yield
        finally:
            hub.close()
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
            await pool.close()

    routes = [
        Route("/v1/notifications", _observed("list", h.list_notifications), methods=["GET"]),
        Route("/v1/notifications/unread-count", _observed("unread_count", h.unread_count), methods=["GET"]),
        Route("/v1/notifications/read-all", _observed("read_all", h.read_all), methods=["POST"]),
        Route("/v1/notifications/{id}/read", _observed("read", h.mark_read), methods=["POST"]),
        Route("/v1/notifications/{id}/archive", _observed("archive", h.archive), methods=["POST"]),
        Route("/v1/preferences", _observed("preferences_get", h.get_preferences), methods=["GET"]),
        Route("/v1/preferences", _observed("preferences_put", h.put_preferences), methods=["PUT"]),
        Route("/v1/endpoints", _observed("endpoints_list", h.list_endpoints), methods=["GET"]),
        Route("/v1/endpoints", _observed("endpoints_add", h.add_endpoint), methods=["POST"]),
        Route("/v1/endpoints/{id}", _observed("endpoints_remove", h.remove_endpoint), methods=["DELETE"]),
        Route("/v1/unsubscribe", _observed("unsubscribe", h.unsubscribe), methods=["POST"]),
        Route("/v1/stream/token", _observed("stream_token", h.stream_token), methods=["POST"]),
        Route("/v1/stream", _observed("stream", h.stream), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        healthz_route(lambda: (not pool.closed, "ok" if not pool.closed else "database pool closed")),
        *_page_routes(settings.app_url),
    ]
    middleware = []
    if settings.api.cors_origins:
        # A product's own frontend on another origin: the token exchange (with Authorization)
        # and the EventSource. Bearer tokens, not cookies: no credentials mode needed.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.api.cors_origins,
                allow_methods=["GET", "POST", "PUT", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=routes, middleware=middleware, exception_handlers=problem_handlers(), lifespan=lifespan
    )
    app.state.stop_streams = hub.close
    return app
