"""A small, strict subset of JSON path for mapping rules: dotted keys and list indexes.

``data.object.customer``, ``pull_request.labels[0].name`` and ``$.issue.user.login``
(a leading ``$.`` is allowed and ignored). No wildcards, filters or slices: a rule
names one value, and a path that names nothing is *missing*, which the rule decides
how to treat. Keys containing dots or brackets cannot be named; no shipped shape
needs them. A dependency (jsonpath-ng) would bring a whole expression language we
would then have to keep out of rules files, so this subset is written out and tested.
"""

from __future__ import annotations

import re
from typing import Any, Final

MISSING: Final = object()

_STEP = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")
_INDEX = re.compile(r"\[(\d+)\]")

Path = tuple[str | int, ...]


def compile_path(text: str) -> Path:
    """Parse a path once, at start-up; ``ValueError`` says what is wrong with it."""
    body = text[2:] if text.startswith("$.") else text
    if not body:
        raise ValueError(f"empty path {text!r}")
    steps: list[str | int] = []
    for part in body.split("."):
        m = _STEP.fullmatch(part)
        if m is None:
            raise ValueError(f"bad path {text!r}: use dotted keys and [n] list indexes, e.g. a.b[0].c")
        steps.append(m.group(1))
        steps.extend(int(i) for i in _INDEX.findall(m.group(2)))
    return tuple(steps)


def resolve(doc: Any, path: Path) -> Any:
    """The value at ``path``, or ``MISSING``. A JSON ``null`` counts as missing."""
    cur = doc
    for step in path:
        if isinstance(step, int):
            if not isinstance(cur, list) or step >= len(cur):
                return MISSING
        elif not isinstance(cur, dict) or step not in cur:
            return MISSING
        cur = cur[step]
    return MISSING if cur is None else cur
