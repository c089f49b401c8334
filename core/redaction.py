"""What leaves the system is redacted, then truncated, never the other way round.

Truncating first can cut a secret where the pattern no longer sees it: a card number
cut at the summary's limit (``4111 1111 1…``) is nine digits, which no card pattern
matches, and it would be published. So every text field that may leave the system is
redacted whole, then cut to its limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import re2

ELLIPSIS = "\u2026"
MASK = "[redacted]"


@dataclass(frozen=True, slots=True)
class _Redactor:
    """The patterns as one alternation, in two engines.

    RE2 scans a text once for every alternative (a DFA); Python's ``re`` tries each
    alternative at each position, about seven times slower on the default list, and
    this runs over every warning's and critical's summary on ingest's hot path. The two
    agree exactly on printable ASCII, where ``\\d``, ``\\w``, ``\\b`` and ``\\s`` mean the
    same in both (tests/test_redaction_unit.py compares them); any other text, and any
    pattern RE2 cannot compile (lookaround, backreferences), goes through ``re``.
    """

    python: re.Pattern[str]
    fast: Any  # re2._Regexp, or None

    def sub(self, text: str) -> str:
        if self.fast is not None and text.isascii() and text.isprintable():
            # The wrapper's sub loops in Python; most texts hold no secret, and search is C.
            return text if self.fast.search(text) is None else str(self.fast.sub(MASK, text))
        return self.python.sub(MASK, text)


@lru_cache(maxsize=8)
def _compiled(patterns: tuple[str, ...]) -> _Redactor | None:
    if not patterns:
        return None
    combined = "|".join(f"(?:{p})" for p in patterns)
    try:
        fast = re2.compile(combined)
    except re2.error:
        fast = None
    return _Redactor(re.compile(combined), fast)


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
    return text if rx is None else rx.sub(text)


@lru_cache(maxsize=8192)
def _redacted(text: str, patterns: tuple[str, ...]) -> str:
    rx = _compiled(patterns)
    return text if rx is None else rx.sub(text)


def truncate(text: str | None, limit: int) -> str | None:
    """At most ``limit`` characters; a cut text ends with an ellipsis."""
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + ELLIPSIS


def redact_then_truncate(text: str | None, patterns: tuple[str, ...], limit: int) -> str | None:
    return truncate(redact(text, patterns), limit)
