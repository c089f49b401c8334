"""Bearer JWTs: who is asking. The user id is the token's ``sub`` and comes from nowhere else.

PyJWT verifies. The accepted algorithms are exactly the ones a key is configured for
(HS256 with ``HERALD_API__JWT_SECRET``, RS256 with ``HERALD_API__JWT_PUBLIC_KEY``), so
``alg: none`` and algorithm confusion (an RS256 public key used as an HS256 secret) are
refused before any signature is looked at. ``exp`` and ``sub`` are required, ``aud``
must name this API, ``iss`` must match when an issuer is configured.

A verified token is remembered by its exact string in a bounded LRU, with its ``exp``:
a client sends the same token on every request, and RS256 verification alone costs more
than the rest of a small request. A remembered token still stops working at ``exp``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from config.settings import ApiSettings
from core.errors import ConfigError

log = logging.getLogger(__name__)

HS256 = "HS256"
RS256 = "RS256"
# A header longer than this is not a token anyone issued to us; refuse it unparsed.
MAX_TOKEN_CHARS = 8192
_USER_ID_BYTES = 400


class Unauthorized(Exception):
    """401: ``reason`` is a metric label and ``detail`` what the client did wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TokenVerifier:
    """Checks ``Authorization: Bearer <jwt>`` and returns the user id."""

    def __init__(self, api: ApiSettings) -> None:
        keys: dict[str, Any] = {}
        if api.jwt_secret is not None:
            keys[HS256] = api.jwt_secret.get_secret_value().encode()
        if api.jwt_public_key is not None:
            try:
                keys[RS256] = load_pem_public_key(api.jwt_public_key.encode())
            except ValueError as exc:
                raise ConfigError(
                    f"HERALD_API__JWT_PUBLIC_KEY is not a usable PEM public key: {exc}"
                ) from exc
        if not keys:
            raise ConfigError(
                "herald api needs a key to check tokens: set HERALD_API__JWT_SECRET (HS256) "
                "or HERALD_API__JWT_PUBLIC_KEY (RS256, your identity provider's public key)"
            )
        self._keys = keys
        self._audience = api.audience
        self._issuer = api.issuer
        self._leeway = api.leeway_s
        self._cache_size = api.token_cache_size
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def user_id(self, authorization: str | None) -> str:
        return self.session(authorization)[0]

    def session(self, authorization: str | None) -> tuple[str, float]:
        """The user id and the token's ``exp`` (epoch seconds): a stream lives no longer."""
        token = _bearer(authorization)
        hit = self._cache.get(token)
        if hit is not None:
            user, exp = hit
            if time.time() < exp + self._leeway:
                self._cache.move_to_end(token)
                return hit
            del self._cache[token]
            raise Unauthorized("expired", "the token has expired")
        user, exp = self._verify(token)
        if self._cache_size:
            self._cache[token] = (user, exp)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return user, exp

    def _verify(self, token: str) -> tuple[str, float]:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.DecodeError as exc:
            raise Unauthorized("malformed", "the bearer token is not a JWT") from exc
        key = self._keys.get(alg) if isinstance(alg, str) else None
        if key is None or not isinstance(alg, str):
            allowed = " or ".join(sorted(self._keys))
            raise Unauthorized("algorithm", f"tokens must be signed with {allowed}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_sub": True},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("expired", "the token has expired") from exc
        except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as exc:
            reason = "audience" if isinstance(exc, jwt.InvalidAudienceError) else "claims"
            raise Unauthorized(reason, str(exc)) from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthorized("issuer", "the token's issuer is not accepted") from exc
        except jwt.InvalidSignatureError as exc:
            raise Unauthorized("signature", "the token's signature does not verify") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthorized("claims", f"the token is not valid: {exc}") from exc
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub.encode()) > _USER_ID_BYTES:
            raise Unauthorized("claims", "sub must be a user id of 1 to 400 bytes")
        return sub, float(claims["exp"])


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing", "send Authorization: Bearer <token>")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("malformed", "the Authorization header must be: Bearer <token>")
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized("malformed", "the bearer token is too long")
    return token


def mint(api: ApiSettings, user_id: str, ttl_s: int = 3600) -> str:
    """An HS256 token for ``user_id`` with this API's audience (and issuer): ``herald token``,
    the dev stack and the bench. Production tokens come from the product's identity provider."""
    if api.jwt_secret is None:
        raise ConfigError(
            "herald token signs with HERALD_API__JWT_SECRET (HS256), which is not set; "
            "RS256 tokens come from your identity provider"
        )
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "aud": api.audience, "iat": now, "exp": now + ttl_s}
    if api.issuer is not None:
        claims["iss"] = api.issuer
    return jwt.encode(claims, api.jwt_secret.get_secret_value(), algorithm=HS256)


# A stream token is for GET /v1/stream and nothing else: its own audience, so it is never
# accepted as a bearer token (nor a bearer token as a stream token), even with one key.
STREAM_AUDIENCE = "herald-stream"


class StreamTokens:
    """Short-lived signed tokens for ``GET /v1/stream?token=…``: a browser's EventSource
    cannot send an Authorization header, so the page trades its bearer token for one.

    HS256 with ``HERALD_API__STREAM_SECRET``; unset, a key derived from
    ``HERALD_API__JWT_SECRET`` (so every API process sharing that secret accepts the
    others' stream tokens), else a random key of this process. ``sx`` carries the bearer
    token's ``exp``: a stream never outlives the session it was opened with.
    """

    def __init__(self, api: ApiSettings) -> None:
        if api.stream_secret is not None:
            self._key = api.stream_secret.get_secret_value().encode()
        elif api.jwt_secret is not None:
            self._key = hmac.new(
                api.jwt_secret.get_secret_value().encode(), b"herald stream tokens", hashlib.sha256
            ).digest()
        else:
            log.info(
                "stream tokens are signed with a key of this process: with several API processes, "
                "set HERALD_API__STREAM_SECRET on all of them"
            )
            self._key = secrets.token_bytes(32)
        self.ttl_s = api.stream_token_ttl_s

    def mint(self, user_id: str, session_exp: float) -> tuple[str, int]:
        """The token and its lifetime in seconds."""
        now = int(time.time())
        exp = min(now + self.ttl_s, int(session_exp))
        claims = {"sub": user_id, "aud": STREAM_AUDIENCE, "iat": now, "exp": exp, "sx": int(session_exp)}
        return jwt.encode(claims, self._key, algorithm=HS256), max(exp - now, 0)

    def verify(self, token: str | None) -> tuple[str, float]:
        """The user id and the session's end; ``Unauthorized`` otherwise."""
        if not token:
            raise Unauthorized("missing", "token: a stream token from POST /v1/stream/token is required")
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("malformed", "token: too long")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[HS256],
                audience=STREAM_AUDIENCE,
                options={"require": ["exp", "sub", "sx"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("expired", "token: the stream token has expired; get a new one") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthorized("signature", "token: not a stream token this API issued") from exc
        sub, sx = claims.get("sub"), claims.get("sx")
        if not isinstance(sub, str) or not sub or not isinstance(sx, int):
            raise Unauthorized("claims", "token: not a stream token this API issued")
        return sub, float(sx)
