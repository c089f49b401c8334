"""What leaves the system is redacted, then truncated, never the other way round.

Truncating first can cut a secret where the pattern no longer sees it: a card number
cut at the summary's limit (``4111 1111 1…``) is nine digits, which no card pattern
matches, and it would be published. So every text field that may leave the system is
redacted whole, then cut to its limit.
"""

from __future__ import annotations

import re
from functools import lru_cache

ELLIPSIS = "\u2026"
MASK = "[redacted]"


@lru_cache(maxsize=8)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in patterns))


# Texts up to this long are cached: titles and summaries repeat (one per channel, and the
# same job failing). Whole bodies (up to 10,000 characters, rarely repeated) are not: the
# cache would hold megabytes of them for no hits.
CACHED_CHARS = 512


def redact(text: str | None, patterns: tuple[str, ...]) -> str | None:
    """Mask what the redaction list matches."""
    if text is None or not patterns:
        return text
    if len(text) <= CACHED_CHARS:
        return _redacted(text, patterns)
    rx = _compiled(patterns)
    return text if rx is None else rx.sub(MASK, text)


@lru_cache(maxsize=8192)
def _redacted(text: str, patterns: tuple[str, ...]) -> str:
    rx = _compiled(patterns)
    return text if rx is None else rx.sub(MASK, text)


def truncate(text: str | None, limit: int) -> str | None:
    """At most ``limit`` characters; a cut text ends with an ellipsis."""
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + ELLIPSIS


def redact_then_truncate(text: str | None, patterns: tuple[str, ...], limit: int) -> str | None:
    return truncate(redact(text, patterns), limit)
