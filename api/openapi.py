"""The API's OpenAPI 3.1 document, written next to the routes it describes.

Starlette has no generator, and this is small enough to keep by hand. It must stay
truthful: tests/test_api_schemathesis.py drives every operation from this document and
checks each response's status, content type and body against it.
"""

from __future__ import annotations

from typing import Any

from config.settings import ApiSettings
from core import __version__

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_TS = {"type": "string", "format": "date-time"}
_TS_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_BOOL_MAP = {
    "type": "object",
    "properties": {c: {"type": "boolean"} for c in ("in_app", "email", "push", "webhook")},
    "additionalProperties": False,
}

_REASONS = {
    400: "Malformed input: a parameter, the id, the cursor, the JSON body or the Last-Event-ID",
    401: "No bearer token (or stream token), or one that does not verify (expired, wrong audience, ...)",
    403: "The unsubscribe token's signature does not match",
    404: "No such notification (or endpoint) for this user (whether it exists for another is not said)",
    413: "The body is larger than the limit",
    415: "The body is not application/json",
    422: "The JSON body does not match the schema, or turns a mandatory category off",
    503: "PostgreSQL is unreachable or busy; retry later",
}


def _problems(*codes: int) -> dict[str, Any]:
    return {
        str(code): {
            "description": _REASONS[code],
            "content": {"application/problem+json": {"schema": _PROBLEM}},
        }
        for code in codes
    }


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"200": {"description": description, "content": {"application/json": {"schema": schema}}}}


_AUTHED = (400, 401, 503)
_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
    "description": "The notification's id",
}


def document(api: ApiSettings) -> dict[str, Any]:
    """The document for this server's limits (page sizes come from settings)."""
    state = {"$ref": "#/components/schemas/NotificationState"}
    prefs = {"$ref": "#/components/schemas/Preferences"}
    endpoint = {"$ref": "#/components/schemas/Endpoint"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "herald in-app API",
            "version": __version__,
            "description": "The inbox, its live stream, preferences and one-click unsubscribe. "
            "Errors are RFC 9457 problems.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/notifications": {
                "get": {
                    "operationId": "listNotifications",
                    "summary": "A page of the inbox, newest first (archived and hidden rows left out)",
                    "parameters": [
                        {
                            "name": "unread",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["1", "0", "true", "false"]},
                            "description": "1: unread only",
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": api.max_page_size},
                            "description": f"page size (default {api.default_page_size})",
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "next_cursor of the previous page, as is",
                        },
                    ],
                    "responses": {
                        **_ok("A page", {"$ref": "#/components/schemas/Page"}),
                        **_problems(*_AUTHED),
                    },
                }
            },
            "/v1/notifications/unread-count": {
                "get": {
                    "operationId": "unreadCount",
                    "summary": "How many visible notifications have no read_at",
                    "responses": {
                        **_ok(
                            "The count",
                            {
                                "type": "object",
                                "properties": {"count": {"type": "integer", "minimum": 0}},
                                "required": ["count"],
                                "additionalProperties": False,
                            },
                        ),
                        **_problems(401, 503),
                    },
                }
            },
            "/v1/notifications/{id}/read": {
                "post": {
                    "operationId": "markRead",
                    "summary": "Mark one notification read (idempotent: the first read_at stays)",
                    "parameters": [_ID_PARAM],
                    "responses": {**_ok("Its state", state), **_problems(*_AUTHED, 404)},
                }
            },
            "/v1/notifications/{id}/archive": {
                "post": {
                    "operationId": "archive",
                    "summary": "Archive one notification (idempotent); it leaves the list and the count",
                    "parameters": [_ID_PARAM],
                    "responses": {**_ok("Its state", state), **_problems(*_AUTHED, 404)},
                }
            },
            "/v1/notifications/read-all": {
                "post": {
                    "operationId": "markAllRead",
                    "summary": "Mark every visible unread notification created at or before `before` read",
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReadAll"}}},
                    },
                    "responses": {
                        **_ok(
                            "How many were marked now",
                            {
                                "type": "object",
                                "properties": {"marked": {"type": "integer", "minimum": 0}},
                                "required": ["marked"],
                                "additionalProperties": False,
                            },
                        ),
                        **_problems(*_AUTHED, 413, 415, 422),
                    },
                }
            },
            "/v1/preferences": {
                "get": {
                    "operationId": "getPreferences",
                    "summary": "The effective preferences (defaults where the user never chose)",
                    "responses": {**_ok("Preferences", prefs), **_problems(401, 503)},
                },
                "put": {
                    "operationId": "putPreferences",
                    "summary": "Set what the body names; `categories` replaces the whole map",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/PreferencesIn"}}
                        },
                    },
                    "responses": {**_ok("Preferences", prefs), **_problems(*_AUTHED, 413, 415, 422)},
                },
            },
            "/v1/stream/token": {
                "post": {
                    "operationId": "streamToken",
                    "summary": "Trade the bearer token for a short-lived stream token (for EventSource)",
                    "description": "Valid for `expires_in` seconds (HERALD_API__STREAM_TOKEN_TTL_S), "
                    "never past the bearer token's own exp; for GET /v1/stream only. Any body is ignored.",
                    "responses": {
                        **_ok(
                            "A stream token",
                            {
                                "type": "object",
                                "properties": {
                                    "token": {"type": "string"},
                                    "expires_in": {"type": "integer", "minimum": 0},
                                },
                                "required": ["token", "expires_in"],
                                "additionalProperties": False,
                            },
                        ),
                        **_problems(401, 413, 503),
                    },
                }
            },
            "/v1/stream": {
                "get": {
                    "operationId": "stream",
                    "summary": "Server-Sent Events: new notifications and unread counts, live",
                    "description": "Events: `notification` (data: a Notification; oldest first), `reset` "
                    "(more were missed than one burst carries: reload the list), `unread` (data: "
                    '`{"count": n}`; its `id` is the position after everything sent before it). '
                    "A `: ping` comment every HERALD_API__STREAM_HEARTBEAT_S. Reconnect with "
                    "Last-Event-ID (EventSource does) or `last_event_id`: nothing is missed; a "
                    "notification may come twice, so keep them by id.",
                    "security": [],
                    "parameters": [
                        {
                            "name": "token",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                            "description": "from POST /v1/stream/token",
                        },
                        {
                            "name": "last_event_id",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "the last event id seen, for a new EventSource (the "
                            "Last-Event-ID header wins when both are sent)",
                        },
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "schema": {"type": "string"},
                            "description": "sent by EventSource when it reconnects",
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The event stream, until the client leaves, the session "
                            "expires, or the server drops a client that fell behind",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_problems(400, 401, 503),
                    },
                }
            },
            "/v1/endpoints": {
                "get": {
                    "operationId": "listEndpoints",
                    "summary": "The user's email addresses and push subscriptions",
                    "responses": {
                        **_ok(
                            "The endpoints, oldest first",
                            {
                                "type": "object",
                                "properties": {"items": {"type": "array", "items": endpoint}},
                                "required": ["items"],
                                "additionalProperties": False,
                            },
                        ),
                        **_problems(401, 503),
                    },
                },
                "post": {
                    "operationId": "addEndpoint",
                    "summary": "Add an email address, or the browser's PushSubscription (its JSON)",
                    "description": "Adding one that exists (or was removed) keeps one, enabled. Deliveries "
                    "go to it once the user's preference for the channel is on.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/EndpointIn"}}
                        },
                    },
                    "responses": {
                        "201": {
                            "description": "Stored",
                            "content": {"application/json": {"schema": endpoint}},
                        },
                        **_problems(*_AUTHED, 413, 415, 422),
                    },
                },
            },
            "/v1/endpoints/{id}": {
                "delete": {
                    "operationId": "removeEndpoint",
                    "summary": "Remove one of the user's endpoints (nothing is sent to it any more)",
                    "parameters": [
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                            "description": "The endpoint's id",
                        }
                    ],
                    "responses": {"204": {"description": "Removed"}, **_problems(401, 404, 503)},
                }
            },
            "/v1/unsubscribe": {
                "post": {
                    "operationId": "unsubscribe",
                    "summary": "RFC 8058 one-click unsubscribe: turns the token's channel off for its user",
                    "security": [],
                    "parameters": [
                        {
                            "name": "token",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                            "description": "from the email's List-Unsubscribe link",
                        }
                    ],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/x-www-form-urlencoded": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"List-Unsubscribe": {"type": "string"}},
                                }
                            }
                        },
                    },
                    "responses": {
                        **_ok(
                            "Unsubscribed (again, if it already was)",
                            {
                                "type": "object",
                                "properties": {
                                    "channel": {"type": "string", "enum": ["email", "push", "webhook"]},
                                    "unsubscribed": {"type": "boolean"},
                                },
                                "required": ["channel", "unsubscribed"],
                                "additionalProperties": False,
                            },
                        ),
                        **_problems(400, 403, 404, 413, 503),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Problem": {
                    "type": "object",
                    "description": "RFC 9457 problem details",
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                    "required": ["type", "title", "status"],
                },
                "Notification": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "type": {"type": "string"},
                        "category": {"type": ["string", "null"]},
                        "severity": {"type": "string", "enum": ["info", "success", "warning", "critical"]},
                        "title": {"type": "string"},
                        "body": {"type": ["string", "null"]},
                        "summary": {"type": ["string", "null"]},
                        "target_url": {"type": ["string", "null"]},
                        "occurred_at": _TS,
                        "created_at": _TS,
                        "read_at": _TS_OR_NULL,
                        "archived_at": _TS_OR_NULL,
                    },
                    "required": [
                        "id",
                        "type",
                        "category",
                        "severity",
                        "title",
                        "body",
                        "summary",
                        "target_url",
                        "occurred_at",
                        "created_at",
                        "read_at",
                        "archived_at",
                    ],
                    "additionalProperties": False,
                },
                "Page": {
                    "type": "object",
                    "properties": {
                        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Notification"}},
                        "next_cursor": {"type": ["string", "null"]},
                    },
                    "required": ["items", "next_cursor"],
                    "additionalProperties": False,
                },
                "NotificationState": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "read_at": _TS_OR_NULL,
                        "archived_at": _TS_OR_NULL,
                    },
                    "required": ["id", "read_at", "archived_at"],
                    "additionalProperties": False,
                },
                "ReadAll": {
                    "type": "object",
                    "properties": {"before": {**_TS, "description": "RFC 3339 with an offset"}},
                    "additionalProperties": False,
                },
                "Preferences": {
                    "type": "object",
                    "properties": {
                        "channels": {**_BOOL_MAP, "required": ["in_app", "email", "push", "webhook"]},
                        "categories": {"type": "object", "additionalProperties": _BOOL_MAP},
                        "digest_minutes": {"type": "integer", "minimum": 0},
                        "mandatory_categories": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["channels", "categories", "digest_minutes", "mandatory_categories"],
                    "additionalProperties": False,
                },
                "Endpoint": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "channel": {"type": "string", "enum": ["email", "push"]},
                        "address": {"type": "string"},
                        "subscription": {"$ref": "#/components/schemas/PushSubscription"},
                    },
                    "required": ["id", "channel"],
                    "additionalProperties": False,
                },
                "PushSubscription": {
                    "type": "object",
                    "properties": {
                        "endpoint": {"type": "string"},
                        "keys": {
                            "type": "object",
                            "properties": {"p256dh": {"type": "string"}, "auth": {"type": "string"}},
                            "required": ["p256dh", "auth"],
                        },
                    },
                    "required": ["endpoint", "keys"],
                },
                "EndpointIn": {
                    "type": "object",
                    "description": "channel email with address, or channel push with subscription",
                    "properties": {
                        "channel": {"type": "string", "enum": ["email", "push"]},
                        "address": {"type": "string", "minLength": 3, "maxLength": 320},
                        "subscription": {"$ref": "#/components/schemas/PushSubscription"},
                    },
                    "required": ["channel"],
                    "additionalProperties": False,
                },
                "PreferencesIn": {
                    "type": "object",
                    "properties": {
                        "channels": _BOOL_MAP,
                        "categories": {
                            "type": "object",
                            "maxProperties": 200,
                            "propertyNames": {"minLength": 1, "maxLength": 100, "pattern": "^[^\\u0000]+$"},
                            "additionalProperties": _BOOL_MAP,
                        },
                        "digest_minutes": {"type": "integer", "minimum": 0, "maximum": 1440},
                    },
                    "additionalProperties": False,
                },
            },
        },
    }
