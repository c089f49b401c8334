"""``herald bench deliver --channel webhook|email``: deliveries per second through one ``herald deliver``.

A run, in this order:

1. backends: an existing broker and database when ``HERALD_KAFKA_BOOTSTRAP`` and
   ``HERALD_DATABASE_URL`` are both set, else an embedded stack in a temporary folder;
2. a loopback receiver in its own process (``python -m herald.bench.deliver``). Webhook: it
   checks every Standard Webhooks signature (HMAC-SHA256 as the spec writes it), answers
   200 after ``--latency-ms`` (50 by default: a provider's think time), and counts each
   ``webhook-id``. Email: an SMTP server (aiosmtpd) that takes each message after
   ``--latency-ms`` and counts its ``Message-ID`` (a message without one counts as refused);
   it answers ``/stats`` over HTTP on a second port;
3. the work: ``--users`` users who want the channel, each with one endpoint on the receiver
   (a webhook URL, an email address), and ``--deliveries`` critical events through the
   real ingest (in this process, not timed), which writes one delivery row and one
   delivery record each;
4. the measured part: one ``herald deliver --channel <channel>`` process, started after the
   records are waiting; timed from its first claim to its last row recorded as sent
   (both read from the rows: ``first_attempt_at`` and ``sent_at``);
5. verify: every row ``sent``, every delivery id received by the receiver, no request
   refused (bad signature, no Message-ID); ``duplicates`` counts receipts beyond one per delivery;
6. SIGTERM the deliverer (it must exit 0) and print a summary and, last, one JSON line with
   ``deliveries``, ``deliveries_per_s``, ``p50_ms``, ``p99_ms`` and ``duplicates``.

``p50_ms``/``p99_ms``: per delivery, from its claim to its outcome on record (the provider's
50 ms, waiting for a send slot, and the recording).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from typing import Any

from psycopg import connect

from config.settings import Settings
from core.errors import ConfigError
from core.webhooks import new_secret
from herald.bench import common
from herald.bench.common import (
    BenchError,
    HeraldChild,
    backends,
    child_env,
    emit_json,
    produce,
    progress,
    say,
)
from herald.bench.ingest import measure_ingest
from herald.embedded import free_port
from herald.processes import deliver_group, herald_command
from producers.topics import Topics, ensure_topics
from storage.migrate import migrate

CHANNELS = ("webhook", "email")
# {channel} is one of CHANNELS, a preference column.
_PREFS_SQL = """
INSERT INTO notification_preferences (user_id, {channel})
SELECT u, true FROM unnest(%s::text[]) AS u ORDER BY 1
ON CONFLICT (user_id) DO UPDATE SET {channel} = true, updated_at = now()
"""
_ENDPOINTS_SQL = """
INSERT INTO channel_endpoints (user_id, channel, address, secret)
SELECT u, %s, %s, %s FROM unnest(%s::text[]) AS u ORDER BY 1
ON CONFLICT (user_id, channel, address) DO NOTHING
"""
_PROGRESS_SQL = (
    "SELECT count(*) FILTER (WHERE status = 'sent'), count(*) FROM deliveries WHERE user_id LIKE %s"
)
_STATES_SQL = """
SELECT status, left(last_error, 80), count(*) FROM deliveries WHERE user_id LIKE %s
GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 5
"""
_ATTEMPTS_SQL = """
SELECT a.outcome, left(a.error, 80), count(*) FROM delivery_attempts a
JOIN deliveries d ON d.id = a.delivery_id WHERE d.user_id LIKE %s GROUP BY 1, 2 ORDER BY 3 DESC
"""
_TIMES_SQL = """
SELECT extract(epoch FROM max(sent_at) - min(first_attempt_at)),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - last_attempt_at)),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - last_attempt_at)),
       count(*) FILTER (WHERE status = 'sent'), count(*), count(DISTINCT id)
FROM deliveries WHERE user_id LIKE %s
"""


def run_deliver_bench(
    settings: Settings, *, channel: str, deliveries: int, users: int, latency_ms: int, concurrency: int | None
) -> int:
    if channel not in CHANNELS:
        raise ConfigError(f"bench deliver has receivers for {', '.join(CHANNELS)}, not {channel!r}")
    if deliveries < 100 or users < 1 or latency_ms < 0:
        raise ConfigError("need --deliveries >= 100, --users >= 1 and --latency-ms >= 0")
    run_id = uuid.uuid4().hex[:10]
    with backends(settings) as (base, where):
        bench = base.model_copy(
            update={
                "topic_prefix": f"bench{run_id}",
                "metrics_port": -1,
                "session_timeout_ms": 6000,
                # The work is criticals for a few users: the per-user rate limit must not fold them.
                "policy": base.policy.model_copy(update={"rate_limits": {channel: 10_000_000}}),
            }
        )
        if concurrency is not None:
            bench = bench.model_copy(
                update={"delivery": bench.delivery.model_copy(update={"concurrency": concurrency})}
            )
        print(f"herald bench deliver: run {run_id}, {where}", flush=True)
        return _run(bench, run_id, channel, deliveries=deliveries, users=users, latency_ms=latency_ms)


def _run(
    settings: Settings, run_id: str, channel: str, *, deliveries: int, users: int, latency_ms: int
) -> int:
    url = settings.database_url.get_secret_value()
    migrate(url)
    machine = common.machine()
    say(f"machine: {machine['cores']} cores, {machine['platform']}, Python {machine['python']}")
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, [topics.events, topics.deliveries(channel)])
    secret = new_secret() if channel == "webhook" else None
    user_ids = [f"{run_id}-u{j}" for j in range(users)]
    with Sink(channel, secret, latency_ms) as sink:
        with connect(url) as conn, conn.transaction():
            conn.execute(_PREFS_SQL.format(channel=channel).encode(), (user_ids,))
            conn.execute(_ENDPOINTS_SQL, (channel, sink.address, secret, user_ids))
        records = [_event(run_id, i, user_ids[i % users]) for i in range(deliveries)]
        positions = produce(settings, topics.events, records)
        measure_ingest(settings, f"{run_id}-ingest", positions, deliveries)
        pattern = f"{run_id}-u%"
        with connect(url, autocommit=True) as conn:
            queued = _one(conn.execute(_PROGRESS_SQL, (pattern,)).fetchone())[1]
            if queued != deliveries:
                raise BenchError(f"ingest wrote {queued} delivery rows for {deliveries} events")
            progress(
                f"deliver: {deliveries:,} {channel} deliveries waiting; one herald deliver process, "
                f"concurrency {settings.delivery.concurrency}, receiver latency {latency_ms} ms"
            )
            env = child_env(
                settings,
                HERALD_DELIVERY__CONCURRENCY=str(settings.delivery.concurrency),
                **sink.settings_env(),
            )
            deliverer = Deliverer(env, channel, deliver_group(channel))
            with deliverer:
                _follow(conn, pattern, deliveries, deliverer)
                deliverer.stop()
            seconds, p50, p99, sent, rows, distinct = _one(conn.execute(_TIMES_SQL, (pattern,)).fetchone())
            attempts = conn.execute(_ATTEMPTS_SQL, (pattern,)).fetchall()
        stats = sink.stats()
    answered = Counter({k: int(v) for k, v in stats["ids"].items()})
    duplicates = sum(n - 1 for n in answered.values())
    rate = deliveries / float(seconds)
    problems = []
    if sent != deliveries or rows != deliveries or distinct != deliveries:
        problems.append(f"{sent} of {deliveries} rows sent")
    if len(answered) != deliveries:
        problems.append(f"the receiver took {len(answered)} distinct deliveries of {deliveries}")
    if stats["refused"]:
        problems.append(f"{stats['refused']} requests refused ({sink.refusal})")
    say(
        f"deliver: {deliveries:,} {channel} deliveries in {float(seconds):.2f} s = {rate:,.0f} deliveries/s "
        f"(one process, concurrency {settings.delivery.concurrency}); claim to recorded p50 "
        f"{float(p50) * 1000:.1f} ms, p99 {float(p99) * 1000:.1f} ms"
    )
    failed_tries = sum(int(n) for outcome, _, n in attempts if outcome != "ok")
    say(
        "attempts: "
        + ", ".join(f"{n:,} {outcome}" + (f" ({error})" if error else "") for outcome, error, n in attempts)
    )
    say(
        f"verify: {sent:,} rows sent, {len(answered):,} delivery ids answered, {duplicates} duplicates, "
        f"{stats['refused']} {sink.refusal}: " + ("ok" if not problems else "WRONG: " + "; ".join(problems))
    )
    emit_json(
        {
            "channel": channel,
            "deliveries": deliveries,
            "deliveries_per_s": round(rate, 1),
            "p50_ms": round(float(p50) * 1000, 2),
            "p99_ms": round(float(p99) * 1000, 2),
            "duplicates": duplicates,
            "failed_attempts": failed_tries,
            "seconds": round(float(seconds), 4),
            "concurrency": settings.delivery.concurrency,
            "receiver_latency_ms": latency_ms,
            "users": users,
            "machine": machine,
        }
    )
    if problems:
        raise BenchError("; ".join(problems))
    return 0


def _one(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    assert row is not None
    return row


def _event(run_id: str, i: int, user: str) -> tuple[bytes, bytes]:
    ev = {
        "id": f"{run_id}-d{i}",
        "type": "job.failed",
        "title": f"Nightly export #{i} failed",
        "user_id": user,
        "severity": "critical",
        "source": "bench",
        "category": "jobs",
        "target_url": f"/jobs/{i}",
    }
    return user.encode(), json.dumps(ev, separators=(",", ":")).encode()


def _follow(conn: Any, pattern: str, deliveries: int, deliverer: Deliverer) -> None:
    started = time.monotonic()
    deadline = started + 60 + deliveries / 200
    next_line = started
    while True:
        sent = _one(conn.execute(_PROGRESS_SQL, (pattern,)).fetchone())[0]
        if sent >= deliveries:
            return
        if not deliverer.alive():
            raise BenchError(f"herald deliver exited: {deliverer.output()}")
        if time.monotonic() > deadline:
            states = conn.execute(_STATES_SQL, (pattern,)).fetchall()
            raise BenchError(
                f"only {sent:,} of {deliveries:,} sent in {deadline - started:.0f} s; rows: "
                + ", ".join(f"{n} {status} ({error})" for status, error, n in states)
                + f"; herald deliver's last lines: {deliverer.output()[-800:]}"
            )
        if time.monotonic() >= next_line:
            progress(f"deliver: {sent:,} / {deliveries:,} sent")
            next_line += 2.0
        time.sleep(0.25)


class Deliverer(HeraldChild):
    """``herald deliver --channel <channel>`` as a child process."""

    def __init__(self, env: dict[str, str], channel: str, group: str) -> None:
        argv = herald_command("--log-level", "WARNING", "deliver", "--channel", channel, "--group", group)
        super().__init__(argv, env, "herald deliver")

    def __enter__(self) -> Deliverer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the receiver: its own process -------------------------------------------------------------


class Sink:
    """The loopback receiver as a child process, ready when it answers ``/stats``: a webhook
    receiver, or an SMTP server (with ``/stats`` on a port of its own)."""

    def __init__(self, channel: str, secret: str | None, latency_ms: int) -> None:
        self.channel = channel
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-P", "-m", "herald.bench.deliver", "--port", str(port)]
        argv += ["--latency-ms", str(latency_ms)]
        if channel == "email":
            self.smtp_port = free_port()
            argv += ["--smtp-port", str(self.smtp_port)]
            self.address = "inbox@bench.example"
            self.refusal = "without a Message-ID"
        else:
            self.address = f"{self.url}/hook"
            self.refusal = "bad signatures"
        env = {**os.environ, "HERALD_BENCH_SINK_SECRET": secret or ""}  # not on the command line
        self._proc = subprocess.Popen(argv, env=env)

    def settings_env(self) -> dict[str, str]:
        """What the deliverer needs to reach this receiver."""
        if self.channel == "email":
            return {
                "HERALD_SMTP__HOST": "127.0.0.1",
                "HERALD_SMTP__PORT": str(self.smtp_port),
                "HERALD_SMTP__TLS": "none",
                "HERALD_SMTP__FROM": "herald bench <bench@bench.example>",
                "HERALD_PUBLIC_URL": "https://herald.bench.example",
                "HERALD_UNSUBSCRIBE_SECRET": os.urandom(16).hex(),
            }
        return {"HERALD_WEBHOOK__ALLOW_PRIVATE_TARGETS": "true"}

    def __enter__(self) -> Sink:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stats()
                return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("the bench receiver did not start") from None
                time.sleep(0.1)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/stats", timeout=30) as resp:  # noqa: S310 (loopback)
            return dict(json.loads(resp.read()))

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class SinkApp:
    """A raw ASGI app: verify, wait ``latency``, count the ``webhook-id``, answer 200."""

    def __init__(self, secret: str, latency_s: float) -> None:
        self._key = base64.b64decode(secret.removeprefix("whsec_"))
        self._latency = latency_s
        self.ids: Counter[str] = Counter()
        self.refused = 0

    def _verified(self, headers: dict[bytes, bytes], body: bytes) -> str | None:
        msg_id = headers.get(b"webhook-id", b"").decode()
        ts = headers.get(b"webhook-timestamp", b"").decode()
        mac = hmac.new(self._key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        expected = base64.b64encode(mac).decode()
        for entry in headers.get(b"webhook-signature", b"").decode().split(" "):
            version, _, value = entry.partition(",")
            if version == "v1" and hmac.compare_digest(value, expected):
                return msg_id
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            body = json.dumps({"ids": self.ids, "refused": self.refused}).encode()
            return await _answer(send, 200, body)
        chunks = []
        while True:
            event = await receive()
            chunks.append(event.get("body", b""))
            if not event.get("more_body"):
                break
        msg_id = self._verified(dict(scope["headers"]), b"".join(chunks))
        if msg_id is None:
            self.refused += 1
            return await _answer(send, 401, b"{}")
        await asyncio.sleep(self._latency)
        self.ids[msg_id] += 1
        await _answer(send, 200, b"{}")


async def _answer(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class MailSink:
    """aiosmtpd's handler: wait ``latency``, count the ``Message-ID``; ``/stats`` as SinkApp's."""

    def __init__(self, latency_s: float) -> None:
        self._latency = latency_s
        self.ids: Counter[str] = Counter()
        self.refused = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        # The header block only, by hand: the email package would cost the sink a millisecond.
        head = bytes(envelope.original_content or b"").split(b"\r\n\r\n", 1)[0]
        found = _MESSAGE_ID.search(head)
        if found is None:
            self.refused += 1
            return "554 5.6.0 no Message-ID"
        if self._latency:
            await asyncio.sleep(self._latency)
        self.ids[found.group(1).decode()] += 1
        return "250 2.0.0 queued"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await _answer(send, 200, json.dumps({"ids": self.ids, "refused": self.refused}).encode())


_MESSAGE_ID = re.compile(rb"(?im)^Message-ID:\s*(<[^>\r\n]+>)")


async def _serve_mail(sink: MailSink, smtp_port: int, stats_port: int) -> None:
    import uvicorn
    from aiosmtpd.smtp import SMTP

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(sink), "127.0.0.1", smtp_port, backlog=1024)
    config = uvicorn.Config(sink, host="127.0.0.1", port=stats_port, log_level="warning", lifespan="off")
    try:
        await uvicorn.Server(config).serve()
    finally:
        server.close()


def _sink_main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="herald bench deliver's loopback receivers")
    parser.add_argument("--port", type=int, required=True, help="HTTP: the webhook receiver, or /stats")
    parser.add_argument("--smtp-port", type=int, help="serve SMTP here (the email channel)")
    parser.add_argument("--latency-ms", type=int, default=50)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.smtp_port:
        asyncio.run(_serve_mail(MailSink(args.latency_ms / 1000), args.smtp_port, args.port))
        return
    app = SinkApp(os.environ["HERALD_BENCH_SINK_SECRET"], args.latency_ms / 1000)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="off", backlog=4096)


if __name__ == "__main__":
    _sink_main()
