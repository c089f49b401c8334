"""``GET /v1/stream``: Server-Sent Events for one user's inbox, live across tabs and devices.

One LISTEN connection per process (``storage.stream.Listener``) feeds a ``Hub``, which
hands each wake-up to the subscribers of that user, each through its own bounded queue.
The hub never waits: a subscriber whose queue is full is dropped (its response ends, the
browser reconnects with ``Last-Event-ID``), so one slow client never holds up the others.

Events, in the order a client sees them:

- ``notification``: one new notification (the same JSON as an item of ``GET /v1/notifications``),
  oldest first, without an id of its own;
- ``reset``: more were missed than one event burst carries: reload the list;
- ``unread``: ``{"count": n}``, the server's unread count, and ``id:`` the position after
  everything sent before it. A connection that breaks in the middle of a burst resumes from
  the previous ``unread``: a notification may come twice (clients keep them by id), never
  zero times.

A comment line (``: ping``) every ``stream_heartbeat_s`` keeps proxies from timing the
stream out, and the stream ends when the session behind it (the bearer token) expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from core import metrics
from core.errors import DatabaseUnavailable, HeraldError
from storage import stream
from storage.pool import AsyncDatabase

log = logging.getLogger(__name__)

RETRY_MS = 2000  # EventSource's reconnect delay, sent as `retry:`
RESYNC = "resync"  # a wake-up for everyone: the LISTEN connection was (re)made


class Subscriber:
    """One open stream: a bounded queue of wake-ups, and an event set when it is dropped."""

    def __init__(self, user: str, size: int) -> None:
        self.user = user
        self.queue: asyncio.Queue[str] = asyncio.Queue(size)
        self.dropped = asyncio.Event()
        self.reason = ""

    def drop(self, reason: str) -> None:
        if not self.dropped.is_set():
            self.reason = reason
            self.dropped.set()


class Hub:
    """Fans each wake-up out to the subscribers of its user, without ever blocking."""

    def __init__(self, queue_size: int) -> None:
        self._size = queue_size
        self._by_user: dict[str, set[Subscriber]] = defaultdict(set)
        self._closed = False
        self._metrics = metrics.stream()

    def subscribe(self, user: str) -> Subscriber:
        sub = Subscriber(user, self._size)
        if self._closed:
            sub.drop("shutdown")
        self._by_user[user].add(sub)
        self._metrics.clients.inc()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self._by_user.get(sub.user)
        if subs is not None and sub in subs:
            subs.discard(sub)
            if not subs:
                del self._by_user[sub.user]
            self._metrics.clients.dec()
            if sub.reason:
                self._metrics.dropped.labels(sub.reason).inc()

    def publish(self, user: str, kind: str) -> None:
        for sub in list(self._by_user.get(user, ())):
            self._offer(sub, kind)

    def wake_all(self) -> None:
        for subs in list(self._by_user.values()):
            for sub in list(subs):
                self._offer(sub, RESYNC)

    def _offer(self, sub: Subscriber, kind: str) -> None:
        try:
            sub.queue.put_nowait(kind)
        except asyncio.QueueFull:
            sub.drop("slow")

    def close(self) -> None:
        """Server shutdown: end every stream now (clients reconnect to another process)."""
        self._closed = True
        for subs in list(self._by_user.values()):
            for sub in list(subs):
                sub.drop("shutdown")

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_user.values())


def frame(event: str | None = None, data: str | None = None, event_id: str | None = None) -> bytes:
    """One SSE frame. ``data`` is single-line JSON here, so it needs no splitting."""
    lines = []
    if event:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if data is not None:
        lines.append(f"data: {data}")
    return ("\n".join(lines) + "\n\n").encode()


async def _nothing() -> Any:
    return
    yield


class EventStream(StreamingResponse):
    """The streaming response, ended by whichever comes first: the client leaving, the hub
    dropping it, the session expiring, or a database error. (A StreamingResponse for its
    headers and its place among the responses; it writes its own body.)"""

    def __init__(
        self,
        hub: Hub,
        sub: Subscriber,
        db: AsyncDatabase,
        *,
        position: str | None,
        session_exp: float,
        heartbeat_s: float,
        limit: int,
        headers: dict[str, str],
    ) -> None:
        super().__init__(_nothing(), headers=headers, media_type="text/event-stream")
        self._hub = hub
        self._sub = sub
        self._db = db
        self._position = position
        self._session_exp = session_exp
        self._heartbeat_s = heartbeat_s
        self._limit = limit
        self._events = metrics.stream().events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            tasks = {
                asyncio.create_task(self._write(send)),
                asyncio.create_task(self._until_disconnect(receive)),
                asyncio.create_task(self._sub.dropped.wait()),
            }
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                if not task.cancelled() and (exc := task.exception()) is not None:
                    self._log_end(exc)
            # End the chunked body when the client still reads; a dropped one may not.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(send({"type": "http.response.body", "body": b""}), 1.0)
        finally:
            self._hub.unsubscribe(self._sub)

    def _log_end(self, exc: BaseException) -> None:
        if isinstance(exc, DatabaseUnavailable):
            log.warning("stream: ended, PostgreSQL unavailable (%s); the client reconnects", exc)
        elif isinstance(exc, HeraldError):
            log.error("stream: ended: %s", exc)
        elif not isinstance(exc, OSError):
            log.error("stream: ended by an unexpected error", exc_info=exc)

    async def _until_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _write(self, send: Send) -> None:
        """1. the reconnect delay; 2. what the client missed (or just the count); 3. per wake-up,
        what is new and the count; a ping when idle, until the session expires."""
        await self._send(send, f"retry: {RETRY_MS}\n\n".encode())
        await self._sync(send)
        queue = self._sub.queue
        while time.time() < self._session_exp:
            try:
                await asyncio.wait_for(queue.get(), min(self._heartbeat_s, self._session_left()))
            except TimeoutError:
                await self._send(send, b": ping\n\n")
                continue
            while not queue.empty():  # many wake-ups, one look
                queue.get_nowait()
            await self._sync(send)

    def _session_left(self) -> float:
        return max(self._session_exp - time.time(), 0.01)

    async def _sync(self, send: Send) -> None:
        async with self._db.connection() as conn:
            got = await stream.sync(conn, self._sub.user, self._position, self._limit)
        out = [frame("notification", item) for item in got.items]
        self._events.labels("notification").inc(len(got.items))
        if got.more:
            out.append(frame("reset", "{}"))
            self._events.labels("reset").inc()
        out.append(frame("unread", f'{{"count":{got.unread}}}', got.position))
        self._events.labels("unread").inc()
        await self._send(send, b"".join(out))
        self._position = got.position

    @staticmethod
    async def _send(send: Send, body: bytes) -> None:
        message: dict[str, Any] = {"type": "http.response.body", "body": body, "more_body": True}
        await send(message)
