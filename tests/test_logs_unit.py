"""Log lines as JSON (core/logs.py): the formatter, ``configure`` and the setting (pure)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from core.logs import CONTEXT_FIELDS, TEXT_FORMAT, JsonFormatter, configure, json_safe, timestamp
from tests.helpers import ROOT, herald_cli

MARKER = "payload-marker-7f3a"
TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def record(
    msg: str = "hello %s",
    args: tuple[Any, ...] = ("world",),
    *,
    level: int = logging.INFO,
    extra: dict[str, Any] | None = None,
    exc_info: Any = None,
) -> logging.LogRecord:
    """A record as ``logger.log(level, msg, *args, extra=extra)`` makes it."""
    logger = logging.getLogger("herald.test")
    return logger.makeRecord(logger.name, level, __file__, 1, msg, args, exc_info, extra=extra)


def line(rec: logging.LogRecord) -> dict[str, Any]:
    out = JsonFormatter().format(rec)
    assert "\n" not in out
    parsed = json.loads(out)
    assert isinstance(parsed, dict)
    return parsed


def test_a_line_has_the_documented_fields() -> None:
    got = line(record(level=logging.WARNING))
    assert set(got) == {"ts", "level", "logger", "message", "pid"}
    assert TS.match(got["ts"]), got["ts"]
    assert (got["level"], got["logger"], got["message"]) == ("WARNING", "herald.test", "hello world")
    assert isinstance(got["pid"], int)


def test_timestamps_are_rfc3339_utc_to_the_millisecond() -> None:
    assert timestamp(0.0) == "1970-01-01T00:00:00.000Z"
    assert timestamp(1_700_000_000.1239) == "2023-11-14T22:13:20.123Z"
    assert timestamp(1_700_000_000.9999) == "2023-11-14T22:13:20.999Z"  # truncated, never :21.000


def test_context_fields_are_carried_with_json_safe_values() -> None:
    did = uuid.uuid4()
    extra = {
        "topic": "herald.events",
        "partition": 3,
        "offset": 42,
        "delivery_id": did,
        "outcome": "sent",
        "channel": "webhook",
        "group": "herald-deliver-webhook",
        "consumer": "deliver-webhook",
    }
    got = line(record(extra=extra))
    assert {k: got[k] for k in CONTEXT_FIELDS} == {**extra, "delivery_id": str(did)}
    assert set(CONTEXT_FIELDS) == set(extra)


def test_absent_or_none_context_is_left_out() -> None:
    got = line(record(extra={"topic": "t", "partition": None}))
    assert got["topic"] == "t" and "partition" not in got and "offset" not in got


def test_other_extra_keys_never_reach_the_line() -> None:
    """A payload passed by mistake under any other key stays out (a whitelist, not a blacklist)."""
    extra = {
        "payload": {"title": MARKER},
        "value": MARKER.encode(),
        "body": MARKER,
        "data": [MARKER],
        "password": MARKER,
        "topic": "herald.events",
    }
    out = JsonFormatter().format(record(extra=extra))
    assert MARKER not in out
    assert set(json.loads(out)) == {"ts", "level", "logger", "message", "pid", "topic"}


def test_odd_values_become_strings_and_the_line_stays_json() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    got = line(
        record(
            extra={
                "offset": float("nan"),
                "partition": float("inf"),
                "topic": b"raw",
                "outcome": Unprintable(),
                "channel": ("a", 1),
                "group": True,
            }
        )
    )
    assert got["offset"] == "nan" and got["partition"] == "inf"
    assert got["topic"] == "b'raw'"
    assert got["outcome"] == "<unprintable Unprintable>"
    assert got["channel"] == "('a', 1)"
    assert got["group"] is True
    assert json_safe(1.5) == 1.5 and json_safe(7) == 7 and json_safe("s") == "s"


def test_a_multi_line_message_is_still_one_line() -> None:
    got = line(record("first\nsecond %s", ("\u00e9\ud800",)))
    assert got["message"] == "first\nsecond \u00e9\ud800"


def test_the_traceback_comes_only_with_an_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        got = line(record(level=logging.ERROR, exc_info=sys.exc_info()))
    assert got["exc"].startswith("Traceback (most recent call last):")
    assert "ValueError: boom" in got["exc"]
    assert "exc" not in line(record())
    # exc_info=True outside an except block: (None, None, None), no traceback to print.
    assert "exc" not in line(record(exc_info=(None, None, None)))


@contextmanager
def kept_logging() -> Iterator[logging.Logger]:
    """What ``configure`` changes (root handlers and level, the exception hooks), put back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = sys.excepthook, threading.excepthook
    try:
        yield root
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        sys.excepthook, threading.excepthook = hooks


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    with kept_logging() as root:
        yield root


def test_configure_replaces_the_root_handlers_with_one_on_stderr(
    root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    root_logging.addHandler(logging.NullHandler())
    handler = configure("debug", "json")
    assert root_logging.handlers == [handler]
    assert root_logging.level == logging.DEBUG
    logging.getLogger("consumers.loop").debug(
        "%s: committed %s[%d]", "ingest", "t", 0, extra={"topic": "t", "partition": 0}
    )
    logging.getLogger("herald.kafka").error("FAIL [rdkafka#producer-1]: %s", "refused")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [(x["logger"], x["level"]) for x in lines] == [
        ("consumers.loop", "DEBUG"),
        ("herald.kafka", "ERROR"),
    ]
    assert lines[0]["message"] == "ingest: committed t[0]" and lines[0]["topic"] == "t"


def test_the_text_format_is_the_one_herald_always_printed(
    root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    assert TEXT_FORMAT == "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = configure("INFO", "text")
    assert handler.formatter is not None and handler.formatter._fmt == TEXT_FORMAT
    logging.getLogger("consumers.ingest").info("t[0]@5: invalid event", extra={"topic": "t", "offset": 5})
    logging.getLogger("consumers.ingest").debug("not at INFO")
    (out,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO consumers.ingest: t\[0\]@5: invalid event", out
    )


def test_in_json_an_uncaught_exception_is_one_line_too() -> None:
    """In the main thread and in any other: a CRITICAL line with the traceback in ``exc``."""
    code = (
        "import threading\n"
        "from core.logs import configure\n"
        "configure('INFO', 'json')\n"
        "t = threading.Thread(target=lambda: 1 / 0, name='sender')\n"
        "t.start(); t.join()\n"
        "raise RuntimeError('boom')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 1
    lines = [json.loads(x) for x in proc.stderr.splitlines()]
    assert [(x["level"], x["message"]) for x in lines] == [
        ("CRITICAL", "uncaught ZeroDivisionError in thread sender"),
        ("CRITICAL", "uncaught RuntimeError: the process stops"),
    ]
    assert "ZeroDivisionError: division by zero" in lines[0]["exc"]
    assert "RuntimeError: boom" in lines[1]["exc"]


@pytest.mark.usefixtures("no_herald_env")
def test_a_wrong_log_format_is_the_usual_one_line_error() -> None:
    out = herald_cli("ingest", env={"HERALD_LOG_FORMAT": "yaml"})
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("herald: invalid settings: log_format: "), lines[0]
    assert "'text' or 'json'" in lines[0]
