"""``herald produce``: events to a topic, or signed POSTs to a running receiver.

Posting goes through the receiver exactly as a sender would (its scheme, its first
secret, its headers), one request at a time on one keep-alive connection. A 503 is
retried after its ``Retry-After`` (a few times), as a well-behaved sender does.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
import uuid
from collections.abc import Sequence
from urllib.parse import quote, urlsplit

from config.settings import Settings
from core.errors import ConfigError, HeraldError
from producers.publisher import KafkaPublisher, OutRecord
from producers.signatures import scheme_for
from producers.topics import Topics

CHUNK = 5000
POST_ATTEMPTS = 5


class ProgressBar:
    """A one-line bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total = total
        self.done = 0
        self._width = width
        self._drawn = 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._drawn >= 0.1 or self.done >= self.total:
            self._drawn = now
            self._draw()

    def _draw(self) -> None:
        filled = self._width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self._width - filled)
        end = "\n" if self.done >= self.total else ""
        print(f"\r[{bar}] {self.done}/{self.total}", end=end, file=sys.stderr, flush=True)


def read_lines(path: str) -> list[str]:
    """Non-blank lines of a file, or of stdin for ``-``."""
    if path == "-":
        return [line for line in sys.stdin.read().splitlines() if line.strip()]
    try:
        with open(path, encoding="utf-8") as f:
            return [line for line in f.read().splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text: {exc.reason}") from exc


def produce_to_topic(
    settings: Settings,
    topic: str | None,
    key: str | None,
    lines: Sequence[str],
    headers: list[tuple[str, bytes]],
    bar: ProgressBar | None,
) -> int:
    topic = topic or Topics(settings.topic_prefix).events
    publisher = KafkaPublisher(settings)
    try:
        for start in range(0, len(lines), CHUNK):
            chunk = lines[start : start + CHUNK]
            publisher.publish(
                [
                    OutRecord(
                        topic=topic,
                        value=line.encode(),
                        key=key.encode() if key else None,
                        headers=list(headers),
                    )
                    for line in chunk
                ]
            )
            if bar is not None:
                bar.advance(len(chunk))
    finally:
        publisher.close()
    print(f"produced {len(lines)} record(s) to {topic}")
    return 0


def event_id_of(line: str) -> str:
    """The event's own ``id`` when the line is a JSON object with one, else a fresh id."""
    try:
        parsed = json.loads(line)
    except ValueError:
        parsed = None
    value = parsed.get("id") if isinstance(parsed, dict) else None
    return value if isinstance(value, str) and value else f"msg_{uuid.uuid4().hex}"


class ReceiverClient:
    """One keep-alive HTTP connection to a receiver, reopened when the server closes it."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--to-receiver wants an http(s) URL, got {base_url!r}")
        self._parts = parts
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self.base = parts.path.rstrip("/")

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        return cls(self._parts.hostname or "", self._parts.port, timeout=self._timeout)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = self._connect()
            try:
                self._conn.request("POST", self.base + path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.close()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (ConnectionResetError, BrokenPipeError, http.client.CannotSendRequest) as exc:
                # The server closed an idle keep-alive connection: reconnect once.
                self.close()
                if attempt == 2:
                    raise HeraldError(
                        f"the receiver at {self._parts.geturl()} dropped the connection"
                    ) from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise HeraldError(f"cannot reach the receiver at {self._parts.geturl()}: {exc}") from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def post_to_receiver(
    settings: Settings,
    url: str,
    source: str,
    lines: Sequence[str],
    headers: list[tuple[str, bytes]],
    bar: ProgressBar | None,
) -> int:
    """Sign each line with ``source``'s scheme and POST it; exit 1 if any was not accepted."""
    cfg = settings.receiver.sources.get(source)
    if cfg is None:
        known = ", ".join(sorted(settings.receiver.sources)) or "none"
        raise ConfigError(
            f"source {source!r} is not in HERALD_RECEIVER__SOURCES (configured: {known}): "
            "herald produce signs with that source's scheme and secret"
        )
    scheme = scheme_for(cfg)
    client = ReceiverClient(url)
    path = f"/webhooks/{quote(source, safe='')}"
    extra = {name: value.decode() for name, value in headers}
    accepted, failed = 0, 0
    try:
        for line in lines:
            body = line.encode()
            status, detail = _post_one(
                client, path, body, scheme.sign(body, event_id=event_id_of(line)), extra
            )
            if status == 202:
                accepted += 1
            else:
                failed += 1
                print(f"herald produce: line {accepted + failed}: {status} {detail}", file=sys.stderr)
            if bar is not None:
                bar.advance()
    finally:
        client.close()
    print(f"posted {len(lines)} event(s) to {url.rstrip('/')}{path}: {accepted} accepted, {failed} refused")
    return 0 if failed == 0 else 1


def _post_one(
    client: ReceiverClient, path: str, body: bytes, signed: dict[str, str], extra: dict[str, str]
) -> tuple[int, str]:
    headers = {"Content-Type": "application/json", **signed, **extra}
    for attempt in range(1, POST_ATTEMPTS + 1):
        status, resp_headers, data = client.post(path, body, headers)
        if status != 503 or attempt == POST_ATTEMPTS:
            break
        time.sleep(min(float(resp_headers.get("retry-after", "1") or 1), 30.0))
    return status, _problem_title(data)


def _problem_title(data: bytes) -> str:
    try:
        parsed = json.loads(data)
    except ValueError:
        return ""
    if not isinstance(parsed, dict):
        return ""
    return ": ".join(str(parsed[k]) for k in ("title", "detail") if k in parsed)
