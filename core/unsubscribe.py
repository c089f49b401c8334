"""One-click unsubscribe tokens (RFC 8058): made by the email channel, checked by the API.

An email's ``List-Unsubscribe`` header points at ``POST /v1/unsubscribe?token=…``. The
mail client posts there without any login, so the token itself is the authority: it names
the user and the channel to turn off, and an HMAC-SHA256 over both under
``HERALD_UNSUBSCRIBE_SECRET`` proves herald made it. Anyone holding a token can turn off
that one channel for that one user, which is exactly what the link in that user's email
is for; nothing else can be forged or altered into a valid token.

Format: ``v1.<base64url(user_id)>.<channel>.<base64url(mac)>``, URL-safe without escaping.
The MAC covers a tagged, length-prefixed message, so a user id containing dots cannot be
re-split into another (user, channel) pair. Tokens do not expire: an unsubscribe link in
an old email must still work (RFC 8058 asks for that), and turning a channel off twice
changes nothing. Rotating the secret invalidates every link already sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from urllib.parse import quote

from config.settings import CHANNELS
from core.errors import PermanentError

VERSION = "v1"
# A token longer than this cannot have been made by make_token (user ids are ≤ 400 bytes).
MAX_TOKEN_CHARS = 1024
_USER_ID_BYTES = 400


class InvalidToken(PermanentError):
    """Not a token herald made with this secret (forged, altered, truncated, other secret)."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or not text.isascii():
        raise InvalidToken("malformed token")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InvalidToken("malformed token") from exc
    # Only the canonical spelling: the decoder skips stray characters and ignores spare
    # bits, so without this check several strings would name the same bytes.
    if _b64(raw) != text:
        raise InvalidToken("malformed token")
    return raw


def _mac(secret: str, user: bytes, channel: str) -> bytes:
    message = b"herald-unsubscribe\x00%s\x00%d:%s%s" % (
        VERSION.encode(),
        len(user),
        user,
        channel.encode(),
    )
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


def make_token(secret: str, user_id: str, channel: str) -> str:
    """The token for turning ``channel`` off for ``user_id``."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}: one of {', '.join(CHANNELS)}")
    user = user_id.encode()
    if not user or len(user) > _USER_ID_BYTES:
        raise ValueError("user_id must be 1 to 400 bytes")
    return f"{VERSION}.{_b64(user)}.{channel}.{_b64(_mac(secret, user, channel))}"


def read_token(secret: str, token: str) -> tuple[str, str]:
    """``(user_id, channel)`` from a token this secret made, else ``InvalidToken``."""
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidToken("malformed token")
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != VERSION or parts[2] not in CHANNELS:
        raise InvalidToken("malformed token")
    user, channel, mac = _unb64(parts[1]), parts[2], _unb64(parts[3])
    if not hmac.compare_digest(mac, _mac(secret, user, channel)):
        raise InvalidToken("token signature does not match")
    try:
        return user.decode(), channel
    except UnicodeDecodeError as exc:  # only reachable with the secret: still refuse it
        raise InvalidToken("malformed token") from exc


def unsubscribe_url(public_url: str, secret: str, user_id: str, channel: str) -> str:
    """The RFC 8058 one-click target for an email's ``List-Unsubscribe`` header."""
    token = make_token(secret, user_id, channel)
    return f"{public_url.rstrip('/')}/v1/unsubscribe?token={quote(token, safe='')}"
