"""``herald bench api``: list and unread-count requests over HTTP, with auth, against a real inbox.

A run, in this order:

1. backends: an existing stack when ``HERALD_KAFKA_BOOTSTRAP`` and ``HERALD_DATABASE_URL``
   are both set, else an embedded one in a temporary folder (``common.backends``);
2. migrations, then the inbox: ``--users`` users with ``--per-user`` notifications each
   (40% unread, 3% archived, 2% hidden), generated inside PostgreSQL by one
   ``INSERT … SELECT FROM generate_series`` (no row-by-row round trips), then VACUUM
   ANALYZE so the unread count is an index-only scan, as it is on a settled table;
   user ids carry the run id, so runs never collide and nothing is truncated;
3. ``herald api`` as a child process (the server), on a free loopback port, with a JWT
   secret made for the run; one HS256 token per user, minted here;
4. the load generator, in this process: asyncio (uvloop when installed) with N keep-alive
   connections, each sending one request at a time and reading its answer (a closed loop);
   every request carries its user's bearer token;
5. list phase: ``GET /v1/notifications?limit=30``, a random user each time; half of the
   requests follow the ``next_cursor`` of that user's previous page. A warm-up of
   ``--warmup`` seconds is not counted;
6. unread-count phase: ``GET /v1/notifications/unread-count`` with ``--count-connections``
   connections (fewer: the figure is the latency a page load sees, not a queue's length);
7. verify: every answer was 200, and a sample of counts equals SQL's count; then one
   JSON line: ``requests_per_s`` and ``p99_ms`` (list), ``unread_count_p99_ms``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt

from config.settings import Settings
from core.errors import ConfigError
from herald.bench import common
from herald.bench.common import BenchError, backends, emit_json, progress, say
from herald.embedded import free_port
from herald.processes import herald_command
from storage.db import connect
from storage.migrate import migrate

AUDIENCE = "herald-bench"
PAGE = 30

# Every row in one statement, inside PostgreSQL: the ids are random uuids, created_at spreads
# a user's rows over the last 200 days, and a fixed share is read, archived or hidden.
_LOAD_SQL = """
INSERT INTO notifications (id, user_id, source, type, category, severity, title, body,
    idempotency_key, hidden, occurred_at, created_at, read_at, archived_at)
SELECT gen_random_uuid(), %(prefix)s || u, 'bench', 'invoice.payment_failed', 'billing',
       (ARRAY['info','success','warning','critical'])[1 + (k %% 4)],
       'Payment failed for invoice INV-' || k, 'Your card was declined. Update it to keep your plan.',
       'k:' || %(prefix)s || u || ':' || k, (k %% 50) = 7,
       t, t, CASE WHEN (k %% 10) < 6 THEN t + interval '1 hour' END,
       CASE WHEN (k %% 33) = 5 THEN t + interval '2 hours' END
FROM generate_series(1, %(users)s) AS u, generate_series(1, %(per_user)s) AS k,
     LATERAL (SELECT now() - make_interval(days => k, secs => u %% 86400)) AS ts(t)
"""

_COUNT_SQL = (
    "SELECT count(*) FROM notifications"
    " WHERE user_id = %s AND read_at IS NULL AND NOT hidden AND archived_at IS NULL"
)


@dataclass
class Phase:
    """One phase's answers: latencies of counted requests, and anything that was not a 200."""

    latencies: list[float] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def run_api_bench(
    settings: Settings,
    *,
    users: int,
    per_user: int,
    seconds: float,
    warmup: float,
    connections: int,
    count_connections: int,
) -> int:
    if users < 1 or per_user < 1 or seconds <= 0 or connections < 1 or count_connections < 1:
        raise ConfigError(
            "need --users, --per-user, --seconds, --connections and --count-connections above 0"
        )
    run_id = uuid.uuid4().hex[:8]
    with backends(settings) as (base, where):
        say(f"herald bench api: run {run_id}, {where}")
        return _run(
            base,
            run_id,
            users=users,
            per_user=per_user,
            seconds=seconds,
            warmup=warmup,
            connections=connections,
            count_connections=count_connections,
        )


def _run(
    settings: Settings,
    run_id: str,
    *,
    users: int,
    per_user: int,
    seconds: float,
    warmup: float,
    connections: int,
    count_connections: int,
) -> int:
    url = settings.database_url.get_secret_value()
    migrate(url)
    machine = common.machine()
    say(f"machine: {machine['cores']} cores, {machine['platform']}, Python {machine['python']}")
    prefix = f"api{run_id}-"
    load_s = load_inbox(url, prefix, users, per_user)
    say(f"inbox: {users:,} users x {per_user} notifications = {users * per_user:,} rows in {load_s:.1f} s")
    secret = os.urandom(32).hex()
    port = free_port()
    server = start_server(settings, port, secret)
    try:
        tokens = [mint(secret, f"{prefix}{u}") for u in range(1, users + 1)]
        lists, counts = asyncio_run(
            _load(
                port, tokens, seconds=seconds, warmup=warmup, conns=connections, count_conns=count_connections
            )
        )
        bad = lists.bad + counts.bad
        if bad:
            raise BenchError(f"{len(bad)} answers were not 200, e.g. {bad[0]}")
        verified = verify_counts(url, prefix, port, tokens)
    finally:
        stop_server(server)
    result: dict[str, Any] = {
        "requests_per_s": round(lists.rate(), 1),
        "p50_ms": round(lists.pct(0.50), 2),
        "p99_ms": round(lists.pct(0.99), 2),
        "list_requests": len(lists.latencies),
        "connections": connections,
        "unread_count_requests_per_s": round(counts.rate(), 1),
        "unread_count_p50_ms": round(counts.pct(0.50), 2),
        "unread_count_p99_ms": round(counts.pct(0.99), 2),
        "count_connections": count_connections,
        "users": users,
        "per_user": per_user,
        "rows": users * per_user,
        "seconds": seconds,
        "load_s": round(load_s, 1),
        "verified": verified,
        "machine": machine,
    }
    say(
        f"list: {result['requests_per_s']:,} requests/s over {connections} connections, "
        f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms"
    )
    say(
        f"unread-count: {result['unread_count_requests_per_s']:,} requests/s over {count_connections} "
        f"connections, p50 {result['unread_count_p50_ms']} ms, p99 {result['unread_count_p99_ms']} ms"
    )
    emit_json(result)
    return 0


def load_inbox(url: str, prefix: str, users: int, per_user: int) -> float:
    started = time.perf_counter()
    with connect(url, autocommit=True) as conn:
        conn.execute(_LOAD_SQL, {"prefix": prefix, "users": users, "per_user": per_user})
        # A settled table: statistics, and a visibility map for index-only unread counts.
        conn.execute("VACUUM ANALYZE notifications")
    return time.perf_counter() - started


def mint(secret: str, user: str) -> str:
    exp = int(time.time()) + 3600
    return jwt.encode({"sub": user, "aud": AUDIENCE, "exp": exp}, secret, algorithm="HS256")


def start_server(settings: Settings, port: int, secret: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env |= {
        "HERALD_DATABASE_URL": settings.database_url.get_secret_value(),
        "HERALD_API__PORT": str(port),
        "HERALD_API__JWT_SECRET": secret,
        "HERALD_API__AUDIENCE": AUDIENCE,
        "HERALD_METRICS_PORT": "-1",
        "HERALD_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(herald_command("api"), env=env)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise BenchError(f"herald api exited with {proc.returncode} during start-up")
        try:
            status, _ = asyncio_run(_one(port, "GET", "/healthz", None))
            if status == 200:
                progress(f"herald api (pid {proc.pid}) answers on port {port}")
                return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise BenchError("herald api did not answer /healthz in 30 s")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def asyncio_run(coro: Any) -> Any:
    """uvloop when it is installed (as uvicorn picks it), else asyncio's own loop."""
    try:
        import uvloop
    except ModuleNotFoundError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- the load generator: a minimal HTTP/1.1 keep-alive client, so the client's own cost stays
# -- small next to the server's on the same 2 cores (a full client library costs several times more).


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self._reader = reader
        self._writer = writer
        self._host = host

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, f"127.0.0.1:{port}")

    async def request(self, method: str, path: str, token: str | None) -> tuple[int, bytes]:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self._writer.write(f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\n{auth}\r\n".encode())
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        body = await self._reader.readexactly(length) if length else b""
        return status, body

    def close(self) -> None:
        self._writer.close()


async def _one(port: int, method: str, path: str, token: str | None) -> tuple[int, bytes]:
    conn = await Connection.open(port)
    try:
        return await conn.request(method, path, token)
    finally:
        conn.close()


_CURSOR = b'"next_cursor":"'


async def _list_worker(
    conn: Connection, tokens: list[str], phase: Phase, counting: list[bool], stop: list[bool]
) -> None:
    rng = random.Random()  # noqa: S311 (a workload, not a secret)
    cursors: dict[int, str] = {}
    while not stop[0]:
        user = rng.randrange(len(tokens))
        cursor = cursors.pop(user, None) if rng.random() < 0.5 else None
        path = f"/v1/notifications?limit={PAGE}" + (f"&cursor={cursor}" if cursor else "")
        started = time.perf_counter()
        status, body = await conn.request("GET", path, tokens[user])
        elapsed = time.perf_counter() - started
        if status != 200:
            phase.bad.append(f"{status} {body[:200]!r}")
            continue
        at = body.rfind(_CURSOR)
        if at >= 0:
            cursors[user] = body[at + len(_CURSOR) : body.index(b'"', at + len(_CURSOR))].decode()
        if counting[0]:
            phase.latencies.append(elapsed)


async def _count_worker(
    conn: Connection, tokens: list[str], phase: Phase, counting: list[bool], stop: list[bool]
) -> None:
    rng = random.Random()  # noqa: S311
    while not stop[0]:
        user = rng.randrange(len(tokens))
        started = time.perf_counter()
        status, body = await conn.request("GET", "/v1/notifications/unread-count", tokens[user])
        elapsed = time.perf_counter() - started
        if status != 200:
            phase.bad.append(f"{status} {body[:200]!r}")
        elif counting[0]:
            phase.latencies.append(elapsed)


async def _phase(
    port: int, tokens: list[str], worker: Any, conns: int, seconds: float, warmup: float
) -> Phase:
    phase = Phase()
    counting, stop = [False], [False]
    connections = [await Connection.open(port) for _ in range(conns)]
    tasks = [asyncio.create_task(worker(c, tokens, phase, counting, stop)) for c in connections]
    await asyncio.sleep(warmup)
    counting[0] = True
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    counting[0] = False
    phase.seconds = time.perf_counter() - started
    stop[0] = True
    await asyncio.gather(*tasks)
    for c in connections:
        c.close()
    return phase


async def _load(
    port: int, tokens: list[str], *, seconds: float, warmup: float, conns: int, count_conns: int
) -> tuple[Phase, Phase]:
    progress(f"list phase: {conns} connections, {warmup:.0f} s warm-up, {seconds:.0f} s counted ...")
    lists = await _phase(port, tokens, _list_worker, conns, seconds, warmup)
    progress(f"unread-count phase: {count_conns} connections, {seconds:.0f} s counted ...")
    counts = await _phase(port, tokens, _count_worker, count_conns, seconds, min(warmup, 1.0))
    return lists, counts


def verify_counts(url: str, prefix: str, port: int, tokens: list[str], sample: int = 20) -> bool:
    """A sample of users: the API's unread count (over HTTP, with auth) equals SQL's."""
    rng = random.Random(prefix)  # noqa: S311
    picked = [rng.randrange(len(tokens)) for _ in range(min(sample, len(tokens)))]
    with connect(url, autocommit=True) as conn:
        for i in picked:
            row = conn.execute(_COUNT_SQL, (f"{prefix}{i + 1}",)).fetchone()
            status, body = asyncio_run(_one(port, "GET", "/v1/notifications/unread-count", tokens[i]))
            if status != 200 or row is None or body != b'{"count":%d}' % int(str(row[0])):
                raise BenchError(f"unread count over HTTP ({status} {body[:100]!r}) differs from SQL ({row})")
    return True
