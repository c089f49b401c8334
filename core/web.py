"""What every herald HTTP front (the receiver, the API) shares: serving, health, errors.

Built on Starlette and uvicorn. One error format everywhere: RFC 9457 problem details
(``application/problem+json``), so clients parse a single shape whatever went wrong.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
from collections.abc import Callable
from http import HTTPStatus
from types import FrameType
from typing import Any

import uvicorn
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from core.errors import ConfigError
from core.http import Health

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An RFC 9457 problem details response: ``type`` is about:blank, ``title`` the short
    reason and ``detail`` what this request did wrong (never a payload, never a secret)."""
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def healthz_route(health: Health | Callable[[], tuple[bool, str]]) -> Route:
    """``GET /healthz``: 200 with ``ok``, or 503 with the reason, from a Health or a check."""

    async def healthz(_: Request) -> Response:
        if isinstance(health, Health):
            ok, status = health.ok(), health.status()
        else:
            ok, status = health()
        return PlainTextResponse(f"{status}\n", status_code=200 if ok else 503)

    return Route("/healthz", healthz, methods=["GET"])


def bind(host: str, port: int, setting: str) -> socket.socket:
    """Bind the listening socket up front, so a busy port is a one-line ``ConfigError``
    naming ``setting`` (for example ``HERALD_API__PORT``) rather than a uvicorn traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is in use: set {setting} to a free port, or 0 to pick one"
            ) from exc
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}: check {setting}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def bound_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


class Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM or SIGINT once it has shut down gracefully, so the process would
    end killed by the signal (exit -15) instead of exiting 0 like every other herald process.
    Here a signal only asks for the graceful stop; a second SIGINT still forces it."""

    on_shutdown: Callable[[], None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # First, on the loop: end what would never finish on its own (event streams).
        if self.on_shutdown is not None:
            self.on_shutdown()
        await super().shutdown(sockets)


def server(
    app: Any,
    *,
    log_level: str = "warning",
    graceful_s: float = 10.0,
    on_shutdown: Callable[[], None] | None = None,
) -> uvicorn.Server:
    """A uvicorn server for ``app``, without access logs (they would print paths with tokens).

    ``server(app).run(sockets=[bind(...)])`` serves until SIGTERM or SIGINT, then stops
    accepting, finishes requests in flight (up to ``graceful_s``) and runs the app's
    lifespan shutdown, where an app flushes what it holds. ``on_shutdown`` runs first, on the
    loop: it ends responses that never finish on their own (the API's event streams).
    """
    config = uvicorn.Config(
        app,
        log_level=log_level.lower(),
        # No logging config of uvicorn's own: its lines go through the root handler, in
        # HERALD_LOG_FORMAT like every other line (core/logs.py).
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(graceful_s),
        server_header=False,
        proxy_headers=False,
    )
    srv = Server(config)
    srv.on_shutdown = on_shutdown
    return srv


class HttpProblem(Exception):
    """Raised by a handler to answer with a problem: the app's handler renders it (``problem``)."""

    def __init__(
        self, status: int, title: str, detail: str | None = None, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {title}")
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers

    def response(self) -> JSONResponse:
        return problem(self.status, self.title, self.detail, headers=self.headers)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 past ``max_bytes`` (by its Content-Length, or while
    it streams in when it has none), so a client can never make the process buffer more."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HttpProblem(400, "Bad Request", "Content-Length is not a number")
        if int(declared) > max_bytes:
            raise HttpProblem(413, "Content Too Large", f"the body may be at most {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise HttpProblem(413, "Content Too Large", f"the body may be at most {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _http_exception(_: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (no such route, wrong method) in the same problem format."""
    status = int(getattr(exc, "status_code", 500))
    headers = getattr(exc, "headers", None)
    detail = getattr(exc, "detail", None)
    return problem(status, HTTPStatus(status).phrase, str(detail) if detail else None, headers=headers)


async def _http_problem(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpProblem)
    return exc.response()


async def _unexpected(_: Request, exc: Exception) -> Response:
    log.error("unexpected error answering a request: %s", type(exc).__name__, exc_info=exc)
    return problem(500, "Internal Server Error")


def problem_handlers() -> dict[Any, Callable[[Request, Exception], Any]]:
    """Exception handlers for a Starlette app: every error, routing ones included, as a problem."""
    return {HTTPException: _http_exception, HttpProblem: _http_problem, Exception: _unexpected}
