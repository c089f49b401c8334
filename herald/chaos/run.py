"""``herald chaos``: the whole pipeline on the embedded stack, under load, with faults.

Start-up is ``herald dev``'s (PostgreSQL, broker, migrations, topics, then every process it
runs: ingest, a deliverer per channel, digest, receiver, API, lag exporter), with the long
timers shortened (retry tiers of seconds, 10 s digest windows, a 10 s delivery lease) and
the channels pointed at loopback peers whose outages the run controls (``peers.py``).
Then, for ``duration``: the load (``load.py``), API readers marking notifications read,
and the faults drawn from the seed (``faults.py``), while ``watch.py`` samples RSS, lag
and counters. Then the load stops, everything drains, and ``check.py`` checks the end state.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
from pydantic import SecretStr

import config
from api.auth import mint
from config.settings import Settings, SourceSettings
from consumers.loop import Stopper
from consumers.offsets import Kafka, is_active
from core.webhooks import new_secret
from herald.chaos import check, report
from herald.chaos.faults import Actions, Fault, Injector, kill, run_replay, schedule
from herald.chaos.load import RECEIVER_SOURCE, Generator, Load, UserPlan, plan_users
from herald.chaos.peers import Peers
from herald.chaos.watch import Watcher
from herald.dev import (
    Child,
    child_environment,
    provision,
    start_processes,
    wait_answering,
    wait_healthy,
    with_api,
    with_channels,
)
from herald.embedded import EmbeddedStack, free_port
from herald.inspect import wait_group_stable
from herald.processes import (
    DIGEST_GROUP,
    INGEST_GROUP,
    PROVIDERS,
    deliver_group,
    herald_command,
    herald_groups,
)
from storage.db import Database
from storage.preferences import add_endpoint, set_preferences

log = logging.getLogger(__name__)

RETRY_TIERS = ("1s", "2s", "5s")
# Every long timer, shortened; the session is the load tests' (the embedded broker's
# coordinator misses a 2 s one on these cores under load).
CHAOS_ENV = {
    "HERALD_SESSION_TIMEOUT_MS": "6000",
    "HERALD_DELIVERY__RETRY_TIERS": json.dumps(list(RETRY_TIERS)),
    "HERALD_DELIVERY__MAX_ATTEMPTS": "12",
    "HERALD_DELIVERY__LEASE_S": "10",
    "HERALD_DELIVERY__REBALANCE_GRACE_S": "2",
    "HERALD_WEBHOOK__TIMEOUT_S": "3",
    "HERALD_BREAKER__COOLDOWN_S": "2",
    "HERALD_BREAKER__WINDOW_S": "30",
    "HERALD_POLICY__DIGEST_SECONDS": "10",
    "HERALD_DIGEST__GRACE_S": "2",
    # About 1,000 windows end at each boundary: their digests leave over 8 s of the 10 s
    # window, not in one.
    "HERALD_DIGEST__SPREAD_S": "8",
    "HERALD_LAG_EXPORTER__INTERVAL_S": "2",
    "HERALD_DB_BACKOFF_MAX_MS": "1000",
    "HERALD_RULES_FILE": str(Path(config.__file__).resolve().parent / "rules"),
}
DRAIN_TIMEOUT_S = 300.0


def say(line: str) -> None:
    print(f"herald chaos: {line}", flush=True)


def chaos_settings(settings: Settings, stack: EmbeddedStack, secret: str, smtp_port: int) -> Settings:
    """The driver's view of the stack: the same values the children get from CHAOS_ENV."""
    source = SourceSettings(scheme="standard-webhooks", secrets=(SecretStr(secret),))
    dev = settings.model_copy(
        update={
            "kafka_bootstrap": stack.broker.bootstrap,
            "database_url": SecretStr(stack.postgres.url),
            "session_timeout_ms": 6000,
            "rules_file": Path(CHAOS_ENV["HERALD_RULES_FILE"]),
            "delivery": settings.delivery.model_copy(update={"retry_tiers": RETRY_TIERS}),
            "smtp": settings.smtp.model_copy(
                update={
                    "host": "127.0.0.1",
                    "port": smtp_port,
                    "tls": "none",
                    "from_": "herald@chaos.example",
                }
            ),
            "receiver": settings.receiver.model_copy(update={"sources": {RECEIVER_SOURCE: source}}),
        }
    )
    # VAPID keys for the run (push), as herald dev makes them.
    return with_channels(with_api(dev, free_port()), None)


def store_users(url: str, plans: list[UserPlan], peers: Peers) -> None:
    db = Database(url)
    try:
        for p in plans:
            changes: dict[str, Any] = {c: (c in p.channels) for c in PROVIDERS}
            changes["in_app"] = p.in_app
            if p.digest_minutes is not None:
                changes["digest_minutes"] = p.digest_minutes
            set_preferences(db, p.user, changes)
            for channel, how in p.endpoints.items():
                if channel == "webhook":
                    url_ = peers.webhook_url(p.user) if how == "ok" else peers.reject_url(p.user)
                    add_endpoint(db, p.user, "webhook", url_, peers.webhook_secret)
                elif channel == "email":
                    add_endpoint(db, p.user, "email", f"{p.user}@chaos.example")
                else:
                    add_endpoint(db, p.user, "push", peers.push_subscription(p.user))
    finally:
        db.close()


class Readers:
    """Users reading their inbox through the API while the run goes: list unread, mark some
    read, now and then mark all read. Errors during an outage are counted, not fatal."""

    def __init__(self, settings: Settings, users: list[str], rng: random.Random) -> None:
        self._settings = settings
        self._users = users
        self._rng = random.Random(rng.random())  # noqa: S311 (a seeded load, not a secret)
        self.touched: set[str] = set()
        self.status: Counter[int] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-readers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _request(
        self, conn: http.client.HTTPConnection, method: str, path: str, token: str
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request(method, path, body=b"{}" if method == "POST" else None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.status[resp.status] += 1
        return resp.status, json.loads(data) if data and resp.status == 200 else None

    def _run(self) -> None:
        api = self._settings.api
        conn = http.client.HTTPConnection(api.host, api.port, timeout=5)
        while not self._stop.wait(0.1):
            user = self._rng.choice(self._users)
            token = mint(api, user)
            try:
                status, page = self._request(conn, "GET", "/v1/notifications?unread=true&limit=20", token)
                if status != 200 or not page:
                    continue
                self.touched.add(user)
                if self._rng.random() < 0.1:
                    self._request(conn, "POST", "/v1/notifications/read-all", token)
                    continue
                for item in page["items"][: self._rng.randint(1, 3)]:
                    self._request(conn, "POST", f"/v1/notifications/{item['id']}/read", token)
            except (OSError, http.client.HTTPException, ValueError):
                self.status[0] += 1
                conn.close()
                conn = http.client.HTTPConnection(api.host, api.port, timeout=5)
        conn.close()


class Stack(Actions):
    """The processes of the run, and what each fault does to them."""

    def __init__(
        self,
        settings: Settings,
        embedded: EmbeddedStack,
        children: list[Child],
        peers: Peers,
        watcher: Watcher,
        logdir: Path,
        env: dict[str, str],
    ) -> None:
        self.settings = settings
        self.embedded = embedded
        self.children = {c.name: c for c in children}
        self.extras: list[Child] = []
        self.peers = peers
        self.watcher = watcher
        self.logdir = logdir
        self.env = env
        self.events_topic = f"{settings.topic_prefix}.events"
        self._lock = threading.Lock()

    def running(self) -> list[tuple[str, int, int]]:
        with self._lock:
            procs = [*self.children.values(), *self.extras]
            return [(c.name, c.proc.pid, c.metrics_port) for c in procs if c.proc.poll() is None]

    def _stop_child(self, child: Child, how: str) -> None:
        self.watcher.read_instance(child.name, child.proc.pid, child.metrics_port)
        if how == "killed":
            kill(child.proc)
        else:
            child.stop(60)
        self.watcher.mark(child.proc.pid, how)

    def _wait_joined(self, child: Child, since: int, timeout: float = 120.0) -> None:
        """Until ``child`` (if it is a consumer) logs an assignment after byte ``since`` of its
        log: a process is back when it consumes, not when it answers /healthz, and the next
        fault never stops a consumer still joining (see the README's embedded broker notes)."""
        if group_of(child.name) is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(child.log_path, "rb") as log_file:
                log_file.seek(since)
                if b": assigned " in log_file.read():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{child.name} not assigned any partition {timeout:.0f}s after it started")

    def inject(self, fault: Fault) -> None:
        if fault.kind == "kill":
            child = self.children[fault.target]
            fault.extra["pid"] = child.proc.pid
            self._stop_child(child, "killed")
            time.sleep(fault.hold_s)
            since = log_size(child)
            with self._lock:
                child.restart()
            fault.ended = time.time()
            wait_healthy([child])
            self._wait_joined(child, since)
        elif fault.kind == "postgres":
            self.embedded.postgres.stop()
            time.sleep(fault.hold_s)
            self.embedded.postgres.start()
            fault.ended = time.time()
            self._wait_database()
        elif fault.kind == "provider":
            self.peers.set_mode(fault.target, fault.detail)
            time.sleep(fault.hold_s)
            self.peers.set_mode(fault.target, "ok")
            fault.ended = time.time()
        elif fault.kind == "rebalance":
            base = self.children[fault.target]
            extra_log = self.logdir / f"{fault.target}+.log"
            joined_from = extra_log.stat().st_size if extra_log.exists() else 0
            extra = Child(f"{fault.target}+", base.args, base.env, self.logdir)
            with self._lock:
                self.extras.append(extra)
            wait_healthy([extra])
            self._wait_joined(extra, joined_from)
            time.sleep(fault.hold_s)
            since = log_size(base)
            self._stop_child(extra, "stopped")
            with self._lock:
                self.extras.remove(extra)
            fault.ended = time.time()
            self._wait_joined(base, since)  # the instance that stays takes the partitions back
        elif fault.kind == "replay":
            self._replay(fault)
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        fault.recovered = time.time()

    def _replay(self, fault: Fault) -> None:
        """As an operator does it: stop ingest (SIGTERM: it finishes its batch and leaves the
        group), ``herald replay --from -Nm --yes``, start ingest again."""
        ingest = [c for c in self.children.values() if c.name.startswith("ingest")]
        for child in ingest:
            self._stop_child(child, "stopped")
        with Kafka(self.settings) as k:
            deadline = time.monotonic() + 30
            while is_active(k.state(INGEST_GROUP)):
                if time.monotonic() > deadline:
                    raise RuntimeError("herald-ingest still has members 30 s after its consumers stopped")
                time.sleep(0.2)
        argv = herald_command(
            "replay", "--group", INGEST_GROUP, "--topic", self.events_topic, "--from", fault.detail, "--yes"
        )
        out = run_replay(argv, self.env)
        lines = [line for line in out.splitlines() if "will be read again" in line]
        fault.extra["reread"] = int(lines[-1].split()[0]) if lines else None
        sizes = [log_size(c) for c in ingest]
        with self._lock:
            for child in ingest:
                child.restart()
        fault.ended = time.time()
        wait_healthy(ingest)
        for child, since in zip(ingest, sizes, strict=True):
            self._wait_joined(child, since)

    def _wait_database(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.settings.database_url.get_secret_value(), connect_timeout=2).close()
                return
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop_all(self) -> None:
        for child in [*self.extras, *reversed(list(self.children.values()))]:
            child.stop()


def log_size(child: Child) -> int:
    return child.log_path.stat().st_size if child.log_path.exists() else 0


def group_of(name: str) -> str | None:
    """The consumer group of a process of the run (``ingest-1``, ``deliver-email+``, ...)."""
    base = name.rstrip("+")
    if base.startswith("ingest"):
        return INGEST_GROUP
    if base.startswith("deliver-"):
        return deliver_group(base.removeprefix("deliver-"))
    return DIGEST_GROUP if base == "digest" else None


def run_chaos(
    settings: Settings,
    *,
    duration_s: float,
    rate: float,
    seed: int | None,
    users: int = 200,
    folder: str | None = None,
    report_path: str = "chaos-report.json",
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
) -> int:
    seed = seed if seed is not None else random.SystemRandom().randrange(1, 2**31)
    rng = random.Random(seed)  # noqa: S311 (the run's seed: reproducible, not a secret)
    say(
        f"seed {seed} (reproduce: herald chaos --duration {duration_s:g}s --rate {rate:g} --seed {seed}"
        f"{f' --users {users}' if users != 200 else ''})"
    )
    root = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="herald-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    stopper = Stopper()
    stopper.install()
    with ExitStack() as stack:
        say(f"starting PostgreSQL, the broker and the peers under {root} ...")
        embedded = stack.enter_context(EmbeddedStack(root))
        peers = stack.enter_context(Peers(root))
        secret = new_secret()
        dev = chaos_settings(settings, embedded, secret, peers.smtp_port)
        provision(dev)
        plans = plan_users(rng, users)
        store_users(embedded.postgres.url, plans, peers)
        env = {
            **child_environment(os.environ, dev, None),
            **CHAOS_ENV,
        }
        source_env = {
            f"HERALD_RECEIVER__SOURCES__{RECEIVER_SOURCE.upper()}__SCHEME": "standard-webhooks",
            f"HERALD_RECEIVER__SOURCES__{RECEIVER_SOURCE.upper()}__SECRETS": secret,
        }
        logdir = root / "logs"
        logdir.mkdir(exist_ok=True)
        children, receiver_url = start_processes(dev, env, source_env, logdir)
        groups = [INGEST_GROUP, *map(deliver_group, PROVIDERS), DIGEST_GROUP]
        watcher = Watcher(dev, herald_groups())
        procs = Stack(dev, embedded, children, peers, watcher, logdir, env)
        stack.callback(procs.stop_all)
        wait_healthy(children)
        wait_answering(f"http://127.0.0.1:{dev.api.port}/healthz", procs.children["api"])
        for group in groups:
            wait_group_stable(dev, group, timeout=70)
        say(f"{len(children)} herald processes ready; {users} users; load {rate:g}/s for {duration_s:g}s")

        faults = schedule(rng, duration_s)
        say("faults: " + ", ".join(f"{f.name}@{f.at_s:.0f}s" for f in faults))
        gen = Generator(rng, plans)
        load = Load(dev, gen, rate=rate, receiver_url=receiver_url, events_topic=procs.events_topic)
        readers = Readers(dev, [p.user for p in plans], rng)
        started = time.time()
        injector = Injector(faults, procs, started)
        watcher.start(procs.running)
        load.start()
        readers.start()
        stop_faults = threading.Event()
        fault_thread = threading.Thread(
            target=injector.run, args=(stop_faults.is_set, say), name="chaos-faults", daemon=True
        )
        fault_thread.start()
        next_line = started + 10
        while time.time() < started + duration_s and not stopper.event.is_set():
            time.sleep(0.2)
            if time.time() >= next_line:
                next_line += 10
                late = watcher.lag[-1].late if watcher.lag else 0
                say(
                    f"{time.time() - started:.0f}s: {len(load.sent):,} records sent, "
                    f"{late:,} late, {len(peers.accepted()):,} accepted by the peers"
                )
        interrupted = stopper.event.is_set()
        load_end = time.time()
        say("load stopping; waiting for the fault in progress ...")
        stop_faults.set()
        load.stop()
        fault_thread.join(180)
        readers.stop()
        say(f"{len(load.sent):,} records sent in {load_end - started:.0f}s; draining ...")
        stopped_at = time.time()
        drained = drain(dev, watcher, stopper, drain_timeout_s)
        if drained:
            say(f"drained in {time.time() - stopped_at:.1f}s")
        else:
            say("interrupted: not drained" if stopper.event.is_set() else "did NOT drain")
        watcher.stop()
        for name, pid, port in procs.running():
            watcher.read_instance(name, pid, port)
        result = check.run(
            dev,
            load=load,
            plans=plans,
            peers=peers,
            watcher=watcher,
            faults=faults,
            readers=readers.touched,
            drained=drained,
            run_window=(started, load_end),
        )
        doc = report.build(
            seed=seed,
            duration_s=duration_s,
            rate=rate,
            users=users,
            load=load,
            faults=faults,
            watcher=watcher,
            result=result,
            readers=dict(readers.status),
            started=started,
            load_end=load_end,
            folder=str(root),
            interrupted=interrupted,
        )
        report.emit(doc, report_path)
        return 0 if doc["invariants_failed"] == 0 and not interrupted else 1
    return 1


def drain(settings: Settings, watcher: Watcher, stopper: Stopper, timeout_s: float) -> bool:
    """Until nothing is late on any group, no delivery is in flight or waiting for a retry,
    and every digest window has closed: three checks in a row, a second apart."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    url = settings.database_url.get_secret_value()
    while time.monotonic() < deadline and not stopper.event.is_set():
        time.sleep(1.0)
        last = watcher.lag[-1] if watcher.lag else None
        try:
            with psycopg.connect(url, connect_timeout=5) as conn:
                pending = conn.execute(
                    "SELECT (SELECT count(*) FROM deliveries"
                    " WHERE status IN ('queued', 'sending', 'retrying'))"
                    " + (SELECT count(*) FROM digest_windows WHERE status = 'open')"
                ).fetchone()
        except psycopg.Error:
            quiet = 0
            continue
        busy = (pending[0] if pending else 1) or (last is None or last.late > 0 or last.at < time.time() - 3)
        quiet = 0 if busy else quiet + 1
        if quiet >= 3:
            return True
    return False
