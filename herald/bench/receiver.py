"""``herald bench receiver``: concurrent signed webhooks against a real ``herald receiver``.

A run, in this order:

1. backends: an existing broker when ``HERALD_KAFKA_BOOTSTRAP`` and ``HERALD_DATABASE_URL``
   are both set, else an embedded stack in a temporary folder;
2. ``herald receiver`` as its own process on a free port, with one ``bench`` source
   (standard-webhooks, a fresh secret) and a fresh topic;
3. the requests are signed up front (distinct ``webhook-id`` each; native envelopes of
   about 200 bytes), so the load generator only sends bytes;
4. load from a separate process: ``wrk`` (Debian's package) when it is installed, cycling
   through the pre-signed requests from a Lua table for ``--duration`` seconds; else an
   asyncio client in this process with ``--concurrency`` keep-alive connections, sending
   every pre-signed request once. A warm-up pass comes first and is not counted;
5. verify: every 202 is a record on the topic (wrk may leave a few requests in flight
   when it stops; they may land as well, and are allowed for);
6. SIGTERM the receiver (it must exit 0), print a summary and, last, one JSON line with
   ``requests``, ``requests_per_s``, ``p50_ms``, ``p99_ms`` and ``errors``.

Every request is a 2xx or counts as an error, whatever the status.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.settings import Settings
from core.errors import ConfigError
from core.webhooks import new_secret
from herald.bench import common
from herald.bench.common import BenchError, HeraldChild, backends, emit_json, progress, say
from herald.embedded import free_port
from herald.inspect import read_topic
from herald.processes import herald_command
from producers.signatures import StandardWebhooks
from producers.topics import Topics, ensure_topics

SOURCE = "bench"
WARMUP = 500


@dataclass
class LoadResult:
    requests: int  # answered, of any status
    accepted: int  # answered 202
    errors: int  # anything else: other statuses, socket errors, timeouts
    seconds: float
    p50_ms: float
    p99_ms: float
    loadgen: str


def run_receiver_bench(
    settings: Settings,
    *,
    requests: int,
    duration: float,
    concurrency: int,
    loadgen: str,
) -> int:
    if requests < 100 or concurrency < 1 or duration <= 0:
        raise ConfigError("need --requests >= 100, --concurrency >= 1 and --duration > 0")
    if loadgen == "wrk" and shutil.which("wrk") is None:
        raise ConfigError("wrk is not installed (Debian: apt-get install wrk); or use --loadgen python")
    use_wrk = loadgen == "wrk" or (loadgen == "auto" and shutil.which("wrk") is not None)
    run_id = uuid.uuid4().hex[:10]
    with backends(settings) as (base, where):
        bench = base.model_copy(update={"topic_prefix": f"bench{run_id}", "metrics_port": -1})
        print(f"herald bench receiver: run {run_id}, {where}", flush=True)
        return _run(bench, requests=requests, duration=duration, concurrency=concurrency, use_wrk=use_wrk)


def _run(settings: Settings, *, requests: int, duration: float, concurrency: int, use_wrk: bool) -> int:
    machine = common.machine()
    say(f"machine: {machine['cores']} cores, {machine['platform']}, Python {machine['python']}")
    topic = Topics(settings.topic_prefix).events
    ensure_topics(settings, [topic])
    secret = new_secret()
    port = free_port()
    with Receiver(settings, port, secret) as receiver:
        scheme = StandardWebhooks([secret])
        warmup = presign(scheme, port, WARMUP, "warm")
        asyncio.run(python_load(port, warmup, min(concurrency, 16)))
        work = presign(scheme, port, requests, "work")
        progress(
            f"load: {len(work):,} pre-signed requests, {concurrency} connections"
            + (f", wrk for {duration:g} s" if use_wrk else ", asyncio client")
        )
        if use_wrk:
            result = wrk_load(port, work, concurrency, duration)
        else:
            result = asyncio.run(python_load(port, work, concurrency))
        receiver.stop()
    records = read_topic(settings, topic, timeout=120)
    on_topic = len(records) - WARMUP
    # wrk stops with requests in flight: their records may land without their 202 being counted.
    verified = result.accepted <= on_topic <= result.accepted + concurrency
    rate = result.requests / result.seconds
    say(
        f"receiver: {result.requests:,} requests in {result.seconds:.2f} s = {rate:,.0f} requests/s, "
        f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, {result.errors} errors ({result.loadgen}, "
        f"{concurrency} connections)"
    )
    say(
        f"verify: {result.accepted:,} answered 202, {on_topic:,} records on {topic}: "
        + ("ok" if verified else "WRONG")
    )
    emit_json(
        {
            "requests": result.requests,
            "requests_per_s": round(rate, 1),
            "p50_ms": round(result.p50_ms, 2),
            "p99_ms": round(result.p99_ms, 2),
            "errors": result.errors,
            "accepted": result.accepted,
            "records_on_topic": on_topic,
            "verified": verified,
            "loadgen": result.loadgen,
            "concurrency": concurrency,
            # Enough digits that requests / seconds gives requests_per_s back, even for a short run.
            "seconds": round(result.seconds, 4),
            "machine": machine,
        }
    )
    if not verified:
        raise BenchError(f"{result.accepted} requests answered 202 but {on_topic} records are on {topic}")
    return 0


class Receiver(HeraldChild):
    """``herald receiver`` as a child process, ready when its /healthz answers."""

    def __init__(self, settings: Settings, port: int, secret: str) -> None:
        sources = {SOURCE: {"scheme": "standard-webhooks", "secrets": [secret]}}
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        env.update(
            {
                "HERALD_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                "HERALD_TOPIC_PREFIX": settings.topic_prefix,
                "HERALD_METRICS_PORT": "-1",
                "HERALD_LOG_LEVEL": "WARNING",
                "HERALD_RECEIVER__HOST": "127.0.0.1",
                "HERALD_RECEIVER__PORT": str(port),
                "HERALD_RECEIVER__SOURCES": json.dumps(sources),
            }
        )
        for name, value in settings.kafka.items():  # the passthrough (SASL/SSL of an existing cluster)
            env[f"HERALD_KAFKA__{name.replace('.', '_').upper()}"] = value
        super().__init__(herald_command("receiver"), env, "herald receiver")
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Receiver:
        self.start()
        deadline = time.monotonic() + 60
        while not self._healthy():
            if not self.alive() or time.monotonic() > deadline:
                raise BenchError(f"herald receiver did not start: {self.output()}")
            time.sleep(0.1)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:  # noqa: S310 (loopback)
                return bool(resp.status == 200)
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        self.close()


def presign(scheme: StandardWebhooks, port: int, n: int, tag: str) -> list[bytes]:
    """Complete HTTP/1.1 requests, each a distinct native envelope signed as its sender would."""
    out = []
    now = time.time()
    for i in range(n):
        msg_id = f"msg_{tag}_{i}_{uuid.uuid4().hex[:8]}"
        body = json.dumps(
            {
                "id": msg_id,
                "type": "invoice.payment_failed",
                "title": f"Payment failed for invoice INV-{i}",
                "user_id": f"user-{i % 5000}",
                "severity": "critical" if i % 10 == 0 else "info",
            },
            separators=(",", ":"),
        ).encode()
        head = [
            f"POST /webhooks/{SOURCE} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in scheme.sign(body, event_id=msg_id, now=now).items()),
        ]
        out.append(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    return out


# --- wrk -----------------------------------------------------------------------------------------

_WRK_LUA = """
local reqs = {%(requests)s}
local n = #reqs
local i = 0
function setup(thread)
  thread:set("offset", _G.next_offset or 0)
  _G.next_offset = (_G.next_offset or 0) + math.floor(n / 7)
end
function request()
  i = i + 1
  return reqs[((i + (offset or 0)) %% n) + 1]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,' ..
    '"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _lua_string(raw: bytes) -> str:
    text = raw.decode()
    return (
        '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r").replace("\n", "\\n") + '"'
    )


def wrk_load(port: int, work: list[bytes], concurrency: int, duration: float) -> LoadResult:
    """wrk with one thread (the receiver and the broker need the other core), ``concurrency``
    connections, cycling through the pre-signed requests; its Lua ``done`` prints the figures."""
    with tempfile.TemporaryDirectory(prefix="herald-wrk-") as tmp:
        script = Path(tmp) / "signed.lua"
        script.write_text(_WRK_LUA % {"requests": ",\n".join(_lua_string(r) for r in work)})
        run = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{duration:g}s",
                "--timeout",
                "10s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}/webhooks/{SOURCE}",
            ],
            capture_output=True,
            text=True,
            timeout=duration + 120,
            check=False,
        )
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if run.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({run.returncode}): {run.stderr[-1000:] or run.stdout[-1000:]}")
    got: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
    errors = sum(int(got[k]) for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        requests=int(got["requests"]),
        accepted=int(got["requests"]) - int(got["status"]),
        errors=errors,
        seconds=int(got["duration_us"]) / 1e6,
        p50_ms=int(got["p50_us"]) / 1000,
        p99_ms=int(got["p99_us"]) / 1000,
        loadgen="wrk",
    )


# --- asyncio client ------------------------------------------------------------------------------


async def python_load(port: int, work: list[bytes], concurrency: int) -> LoadResult:
    """``concurrency`` keep-alive connections, each sending its share in turn."""
    latencies: list[float] = []
    statuses: list[int] = []
    shares = [work[k::concurrency] for k in range(concurrency)]
    started = time.perf_counter()
    await asyncio.gather(*(_connection(port, share, latencies, statuses) for share in shares if share))
    seconds = time.perf_counter() - started
    latencies.sort()
    accepted = sum(1 for s in statuses if s == 202)
    return LoadResult(
        requests=len(statuses),
        accepted=accepted,
        errors=len(work) - accepted,
        seconds=seconds,
        p50_ms=statistics.median(latencies) * 1000 if latencies else 0.0,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else 0.0,
        loadgen="python",
    )


async def _connection(port: int, share: list[bytes], latencies: list[float], statuses: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for raw in share:
            t0 = time.perf_counter()
            writer.write(raw)
            status, close = await _response(reader)
            latencies.append(time.perf_counter() - t0)
            statuses.append(status)
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    status = int((await reader.readline()).split(b" ", 2)[1])
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close
