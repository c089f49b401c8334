"""The handlers: notifications, preferences, unsubscribe. OpenAPI for each is in ``api/openapi.py``.

Every handler that touches a user's data takes the user id from the verified token
(``TokenVerifier``), never from a path, a query or a body. Bad input answers a precise
4xx problem (RFC 9457) naming the parameter; only PostgreSQL being away answers 503.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.auth import StreamTokens, TokenVerifier, Unauthorized
from api.stream import EventStream, Hub
from config.settings import CHANNELS, Settings
from core import metrics
from core.endpoints import endpoint_address
from core.errors import RecordRejected
from core.policy import PREFERENCE_CHANNELS, Preferences
from core.unsubscribe import InvalidToken, read_token
from core.web import HttpProblem, read_body
from storage import inbox, stream
from storage.pool import AsyncDatabase
from storage.preferences import (
    read_preferences,
    remove_endpoint,
    save_endpoint,
    user_endpoints,
    write_preferences,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
JSON_TYPES = ("application/json", "application/problem+json")

Channel = Literal["in_app", "email", "push", "webhook"]
# Envelope categories are at most 100 characters (and 200 UTF-8 bytes).
# NUL cannot be stored in PostgreSQL text or jsonb.
Category = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[^\x00]+$")]


class PreferencesIn(BaseModel):
    """``PUT /v1/preferences``: what it names is set; ``categories`` replaces the whole map."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: dict[Channel, StrictBool] | None = None
    categories: Annotated[dict[Category, dict[Channel, StrictBool]], Field(max_length=200)] | None = None
    digest_minutes: Annotated[StrictInt, Field(ge=0, le=1440)] | None = None


# Channels whose endpoints a user manages through the API (webhooks carry a signing secret: CLI).
API_ENDPOINT_CHANNELS = ["email", "push"]


class EndpointIn(BaseModel):
    """``POST /v1/endpoints``: an email address, or the browser's ``PushSubscription``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: Literal["email", "push"]
    address: Annotated[str, Field(min_length=3, max_length=320)] | None = None
    subscription: dict[str, Any] | None = None


class ReadAllIn(BaseModel):
    """``POST /v1/notifications/read-all``: ``before`` is the newest ``created_at`` the user saw."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    before: AwareDatetime | None = None


def encode_cursor(after: tuple[datetime, uuid.UUID]) -> str:
    """Opaque to clients: the keyset position (microseconds since the epoch, id)."""
    micros = (after[0] - _EPOCH) // _MICROSECOND
    raw = f"{micros}:{after[1].hex}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(text: str) -> tuple[datetime, uuid.UUID]:
    bad = HttpProblem(400, "Bad Request", "cursor: not a cursor this API returned (use next_cursor as is)")
    if not text.isascii() or len(text) > 100:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        micros, _, hexid = raw.partition(":")
        if not micros.lstrip("-").isdigit() or len(hexid) != 32:
            raise ValueError(raw)
        return _EPOCH + int(micros) * _MICROSECOND, uuid.UUID(hex=hexid)
    except (binascii.Error, ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise bad from exc


def _notification_id(request: Request) -> uuid.UUID:
    text = request.path_params["id"]
    try:
        if len(text) != 36:
            raise ValueError(text)
        return uuid.UUID(text)
    except ValueError as exc:
        raise HttpProblem(
            400, "Bad Request", "id: not a notification id (a UUID like 0b9d6a3e-71c4-…)"
        ) from exc


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value is None or value in ("0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise HttpProblem(400, "Bad Request", f"{name}: expected 1, 0, true or false")


def _json_body(raw: bytes, request: Request) -> Any:
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise HttpProblem(415, "Unsupported Media Type", "send the body as Content-Type: application/json")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpProblem(400, "Bad Request", f"the body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise HttpProblem(400, "Bad Request", "the body is not valid JSON: nested too deeply") from None


def _invalid(exc: ValidationError) -> HttpProblem:
    """422 naming each offending field; never echoing the input."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return HttpProblem(422, "Unprocessable Content", "; ".join(parts)[:1000])


def _state(s: inbox.State) -> JSONResponse:
    return JSONResponse(
        {
            "id": str(s.id),
            "read_at": s.read_at.isoformat() if s.read_at else None,
            "archived_at": s.archived_at.isoformat() if s.archived_at else None,
        }
    )


class Handlers:
    """One per app: the pool, the verifier and the settings they need."""

    def __init__(
        self,
        settings: Settings,
        db: AsyncDatabase,
        verifier: TokenVerifier,
        hub: Hub | None = None,
        stream_tokens: StreamTokens | None = None,
    ) -> None:
        self._settings = settings
        self._api = settings.api
        self._db = db
        self._verifier = verifier
        self._hub = hub if hub is not None else Hub(settings.api.stream_queue_size)
        self._stream_tokens = stream_tokens if stream_tokens is not None else StreamTokens(settings.api)
        self._defaults = Preferences.defaults(settings.policy)
        self._mandatory = sorted(settings.policy.mandatory_categories)
        self._metrics = metrics.api()

    def user(self, request: Request) -> str:
        return self.session(request)[0]

    def session(self, request: Request) -> tuple[str, float]:
        try:
            return self._verifier.session(request.headers.get("authorization"))
        except Unauthorized as exc:
            raise self._unauthorized(exc) from exc

    def _unauthorized(self, exc: Unauthorized) -> HttpProblem:
        self._metrics.auth_failures.labels(exc.reason).inc()
        error = "invalid_request" if exc.reason == "missing" else "invalid_token"
        return HttpProblem(
            401, "Unauthorized", exc.detail, headers={"WWW-Authenticate": f'Bearer error="{error}"'}
        )

    # notifications

    async def list_notifications(self, request: Request) -> Response:
        user = self.user(request)
        unread = _flag(request, "unread")
        limit = self._limit(request)
        cursor = request.query_params.get("cursor")
        after = decode_cursor(cursor) if cursor is not None else None
        async with self._db.connection() as conn:
            page = await inbox.page(conn, user, limit=limit, unread_only=unread, after=after)
        nxt = "null" if page.after is None else f'"{encode_cursor(page.after)}"'
        body = '{"items":[' + ",".join(page.items) + '],"next_cursor":' + nxt + "}"
        return Response(body.encode(), media_type="application/json")

    def _limit(self, request: Request) -> int:
        text = request.query_params.get("limit")
        if text is None:
            return self._api.default_page_size
        if not text.isdigit() or not 1 <= int(text) <= self._api.max_page_size:
            raise HttpProblem(
                400, "Bad Request", f"limit: expected an integer from 1 to {self._api.max_page_size}"
            )
        return int(text)

    async def unread_count(self, request: Request) -> Response:
        user = self.user(request)
        async with self._db.connection() as conn:
            count = await inbox.unread_count(conn, user)
        return Response(b'{"count":%d}' % count, media_type="application/json")

    async def mark_read(self, request: Request) -> Response:
        user = self.user(request)
        nid = _notification_id(request)
        async with self._db.connection() as conn:
            state = await inbox.mark_read(conn, user, nid)
            if state is not None:  # committed (autocommit): the user's other tabs recount
                await stream.notify_user(conn, user, stream.READ)
        return self._found(state)

    async def archive(self, request: Request) -> Response:
        user = self.user(request)
        nid = _notification_id(request)
        async with self._db.connection() as conn:
            state = await inbox.archive(conn, user, nid)
            if state is not None:
                await stream.notify_user(conn, user, stream.READ)
        return self._found(state)

    @staticmethod
    def _found(state: inbox.State | None) -> Response:
        if state is None:
            # The same answer whether it does not exist or is someone else's: no existence leak.
            raise HttpProblem(404, "Not Found", "no such notification")
        return _state(state)

    async def read_all(self, request: Request) -> Response:
        user = self.user(request)
        raw = await read_body(request, self._api.max_body_bytes)
        before = None
        if raw.strip():
            try:
                before = ReadAllIn.model_validate(_json_body(raw, request)).before
            except ValidationError as exc:
                raise _invalid(exc) from exc
        async with self._db.connection() as conn:
            marked = await inbox.mark_all_read(conn, user, before)
            if marked:
                await stream.notify_user(conn, user, stream.READ)
        return JSONResponse({"marked": marked})

    # the live stream (api/stream.py): a bearer token buys a short-lived stream token,
    # because a browser's EventSource cannot send an Authorization header

    async def stream_token(self, request: Request) -> Response:
        user, session_exp = self.session(request)
        await read_body(request, self._api.max_body_bytes)
        token, ttl = self._stream_tokens.mint(user, session_exp)
        return JSONResponse({"token": token, "expires_in": ttl}, headers={"Cache-Control": "no-store"})

    async def stream(self, request: Request) -> Response:
        try:
            user, session_exp = self._stream_tokens.verify(request.query_params.get("token"))
        except Unauthorized as exc:
            raise self._unauthorized(exc) from exc
        # The browser's own reconnect sends the header; a page that opens a new EventSource
        # (after a new token) passes the last id it saw as a parameter.
        position = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        if position is not None and not stream.valid_position(position):
            raise HttpProblem(400, "Bad Request", "Last-Event-ID: not an event id this stream sent")
        sub = self._hub.subscribe(user)  # before the first look, so no wake-up falls between
        try:
            if position is not None:  # a forged position PostgreSQL refuses: 400 before streaming
                async with self._db.connection() as conn:
                    await stream.check_position(conn, position)
        except RecordRejected as exc:
            self._hub.unsubscribe(sub)
            raise HttpProblem(400, "Bad Request", "Last-Event-ID: not an event id this stream sent") from exc
        except BaseException:
            self._hub.unsubscribe(sub)
            raise
        return EventStream(
            self._hub,
            sub,
            self._db,
            position=position,
            session_exp=session_exp,
            heartbeat_s=self._api.stream_heartbeat_s,
            limit=self._api.max_page_size,
            headers={
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx: pass events on at once
            },
        )

    # preferences

    async def get_preferences(self, request: Request) -> Response:
        user = self.user(request)
        async with self._db.connection() as conn:
            stored = await read_preferences(conn, user)
        return JSONResponse(self._effective(stored))

    async def put_preferences(self, request: Request) -> Response:
        user = self.user(request)
        raw = await read_body(request, self._api.max_body_bytes)
        try:
            body = PreferencesIn.model_validate(_json_body(raw, request))
        except ValidationError as exc:
            raise _invalid(exc) from exc
        changes: dict[str, Any] = {str(k): v for k, v in (body.channels or {}).items()}
        if body.categories is not None:
            for name, choice in body.categories.items():
                if name in self._settings.policy.mandatory_categories and not all(choice.values()):
                    raise HttpProblem(
                        422, "Unprocessable Content", f"categories.{name}: mandatory, it cannot be turned off"
                    )
            changes["categories"] = {name: dict(choice) for name, choice in body.categories.items() if choice}
        if body.digest_minutes is not None:
            changes["digest_minutes"] = body.digest_minutes
        async with self._db.connection() as conn:
            stored = await write_preferences(conn, user, changes)
        return JSONResponse(self._effective(stored))

    def _effective(self, stored: dict[str, Any] | None) -> dict[str, Any]:
        prefs = self._defaults.merged(stored) if stored else self._defaults
        return {
            "channels": {c: bool(getattr(prefs, c)) for c in PREFERENCE_CHANNELS},
            "categories": {k: dict(v) for k, v in prefs.categories.items()},
            "digest_minutes": prefs.digest_minutes,
            "mandatory_categories": self._mandatory,
        }

    # endpoints: the user's own email addresses and push subscriptions

    async def add_endpoint(self, request: Request) -> Response:
        user = self.user(request)
        raw = await read_body(request, self._api.max_body_bytes)
        try:
            body = EndpointIn.model_validate(_json_body(raw, request))
        except ValidationError as exc:
            raise _invalid(exc) from exc
        given = body.address if body.channel == "email" else body.subscription
        field = "address" if body.channel == "email" else "subscription"
        if given is None:
            raise HttpProblem(422, "Unprocessable Content", f"{field}: required for channel {body.channel}")
        try:
            address = endpoint_address(body.channel, given, self._settings.push.allow_private_targets)
        except ValueError as exc:
            raise HttpProblem(422, "Unprocessable Content", f"{field}: {exc}"[:1000]) from exc
        async with self._db.connection() as conn:
            endpoint_id = await save_endpoint(conn, user, body.channel, address)
        return JSONResponse(_endpoint(endpoint_id, body.channel, address), status_code=201)

    async def list_endpoints(self, request: Request) -> Response:
        user = self.user(request)
        async with self._db.connection() as conn:
            rows = await user_endpoints(conn, user, API_ENDPOINT_CHANNELS)
        return JSONResponse({"items": [_endpoint(r[0], r[1], r[2]) for r in rows]})

    async def remove_endpoint(self, request: Request) -> Response:
        user = self.user(request)
        raw = request.path_params["id"]
        if not raw.isdigit() or len(raw) > 18:
            raise HttpProblem(404, "Not Found", "no such endpoint")
        async with self._db.connection() as conn:
            found = await remove_endpoint(conn, user, int(raw), API_ENDPOINT_CHANNELS)
        if not found:
            raise HttpProblem(404, "Not Found", "no such endpoint")
        return Response(status_code=204)

    # unsubscribe (RFC 8058): the token is the authority, no bearer token

    async def unsubscribe(self, request: Request) -> Response:
        secret = self._settings.unsubscribe_secret
        if secret is None:
            raise HttpProblem(404, "Not Found", "unsubscribe links are not enabled on this server")
        # RFC 8058: the body is "List-Unsubscribe=One-Click"; read (bounded) and ignore it.
        await read_body(request, self._api.max_body_bytes)
        token = request.query_params.get("token")
        if not token:
            raise HttpProblem(400, "Bad Request", "token: the unsubscribe token from the link is required")
        try:
            user, channel = read_token(secret.get_secret_value(), token)
        except InvalidToken as exc:
            malformed = "malformed" in str(exc)
            raise HttpProblem(
                400 if malformed else 403,
                "Bad Request" if malformed else "Forbidden",
                f"token: {exc}",
            ) from exc
        assert channel in CHANNELS
        async with self._db.connection() as conn:
            await write_preferences(conn, user, {channel: False})
        return JSONResponse({"channel": channel, "unsubscribed": True})


def _endpoint(endpoint_id: int, channel: str, address: str) -> dict[str, Any]:
    if channel == "push":
        return {"id": endpoint_id, "channel": channel, "subscription": json.loads(address)}
    return {"id": endpoint_id, "channel": channel, "address": address}
