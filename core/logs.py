"""How every herald process logs: one handler on stderr, as text or as JSON lines.

``HERALD_LOG_FORMAT=json`` writes one JSON object per line, for a log pipeline to index:
``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``, ``message``, ``pid``, ``exc``
(the traceback, only with one), and the context a call site gave in ``extra=`` among
``CONTEXT_FIELDS`` (``topic``, ``partition``, ``offset``, ``delivery_id``, ``outcome``,
``channel``, ``group``, ``consumer``). Only those: any other attribute of a record is
left out, so a payload passed by mistake in some other ``extra`` key never reaches a log.
The text format is the one herald always printed; it ignores the context (the message
already says ``topic[partition]@offset``).

Everything logs through the root handler: herald's modules, librdkafka (the
``herald.kafka`` logger), uvicorn (``core.web.server`` leaves its logging to us).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from types import TracebackType
from typing import Any, Literal

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The only record attributes a JSON line carries besides its own fields (see the module docstring).
CONTEXT_FIELDS: tuple[str, ...] = (
    "topic",
    "partition",
    "offset",
    "delivery_id",
    "outcome",
    "channel",
    "group",
    "consumer",
)


def timestamp(created: float) -> str:
    """``2024-05-01T12:34:56.789Z``: RFC 3339 in UTC, to the millisecond (truncated)."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"


def json_safe(value: Any) -> str | int | float | bool:
    """Strings, integers, booleans and finite floats as they are; anything else as its str()."""
    if isinstance(value, str | bool | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    try:
        return str(value)
    except Exception:  # noqa: BLE001 (a log line must not fail on an odd value)
        return f"<unprintable {type(value).__name__}>"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in a message or traceback are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        fields = record.__dict__
        for name in CONTEXT_FIELDS:
            value = fields.get(name)
            if value is not None:
                line[name] = json_safe(value)
        if record.exc_info and record.exc_info[0] is not None:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            line["exc"] = record.exc_text
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, separators=(",", ":"), default=str)


class StderrHandler(logging.Handler):
    """Writes to ``sys.stderr`` as it is at each write, not as it was when configured (a test
    runner swaps it; a handler holding the old stream would write to a closed file)."""

    terminator = "\n"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = sys.stderr
            stream.write(line + self.terminator)
            stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 (logging's own rule: report it, never raise it)
            self.handleError(record)


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure(level: str | int, fmt: LogFormat = "text") -> logging.Handler:
    """Replace the root logger's handlers with one on stderr in ``fmt``, at ``level``.

    Called once by ``main``, before anything logs. Returns the handler (tests read it). In
    JSON, an uncaught exception (in the main thread or any other) is logged as one line too,
    rather than printed as a bare traceback that a log pipeline would split line by line.
    """
    handler = StderrHandler()
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    if fmt == "json":
        sys.excepthook = log_uncaught
        threading.excepthook = log_uncaught_in_thread
    return handler


def log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook`` in JSON: the traceback as one CRITICAL line (``exc``)."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("herald").critical(
        "uncaught %s: the process stops", kind.__name__, exc_info=(kind, exc, tb)
    )


def log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook`` in JSON: the thread's traceback as one CRITICAL line."""
    if args.exc_type is SystemExit:  # as the default hook: a thread may end that way
        return
    name = args.thread.name if args.thread is not None else "unknown"
    exc = args.exc_value
    logging.getLogger("herald").critical(
        "uncaught %s in thread %s",
        args.exc_type.__name__,
        name,
        exc_info=(args.exc_type, exc, args.exc_traceback) if exc is not None else None,
    )
