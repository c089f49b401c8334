"""Operator commands: ``replay``, ``dlq list|show``, ``redrive``, ``lag``, ``purge``, ``forget``.

Only argument handling, confirmation and printing live here; the work is in
``consumers/offsets.py`` (lag, replay), ``consumers/redrive.py`` (DLQ, redrive) and
``storage/retention.py`` (purge, forget). Every command that changes something asks first
(the answer defaults to no) unless given ``--yes``, and ``--dry-run`` changes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from config.settings import Settings
from core.errors import ConfigError, HeraldError
from herald.produce import ProgressBar
from producers.publisher import KAFKA_LOG

Command = Callable[[argparse.Namespace, Settings], int]

SETTINGS_NOTE = "Settings come from HERALD_* (`set -a; . .herald/dev.env` for herald dev)."


_RELATIVE_ARG = re.compile(r"^-[1-9][0-9]*[smhd]$")


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """``--from -2h`` as ``--from=-2h``: argparse would take ``-2h`` for an option."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        if args[i] == "--from" and i + 1 < len(args) and _RELATIVE_ARG.match(args[i + 1]):
            out.append(f"--from={args[i + 1]}")
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def confirm(question: str, yes: bool) -> bool:
    """``yes`` (``--yes``) or an answer of y/yes on stdin; anything else, EOF included, is no."""
    if yes:
        return True
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    if not answer:
        print(file=sys.stderr)
    return answer.strip().lower() in ("y", "yes")


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


# -- replay --------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.offsets import apply_replay, is_active, parse_time, plan_replay, refusal

    when = parse_time(args.from_)
    resets, state = plan_replay(settings, args.group, args.topic, when)
    print(f"group {args.group} ({state.name}), from {when.isoformat(timespec='seconds')}")
    rows = [["topic", "partition", "current", "->", "new", "end", "re-read"]]
    for r in resets:
        current = "-" if r.current is None else str(r.current)
        rows.append([r.topic, str(r.partition), current, "->", str(r.new), str(r.end), str(r.reread)])
    _table(rows)
    print(f"{sum(r.reread for r in resets)} record(s) will be read again")
    if is_active(state):
        if args.dry_run:
            print(f"dry run: nothing changed (and {refusal(args.group, state)})")
            return 0
        raise HeraldError(refusal(args.group, state))
    if args.dry_run:
        print("dry run: nothing changed")
        return 0
    if not confirm(f"Reset the offsets of {args.group} as above?", args.yes):
        print("nothing changed")
        return 1
    apply_replay(settings, args.group, resets)
    print(f"offsets of {args.group} reset: start its consumers to replay")
    return 0


# -- dlq -----------------------------------------------------------------------------------


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.offsets import Kafka
    from consumers.reading import read_topic
    from consumers.redrive import decoded_headers, reason_of, summarize

    with Kafka(settings) as k:
        partitions = k.partitions(args.topic)
        if args.dlq_command == "show":
            if args.partition not in partitions:
                raise ConfigError(f"{args.topic} has partitions {partitions}, not {args.partition}")
            low, high = k.watermarks(args.topic, args.partition)
            where = f"{args.topic}[{args.partition}]@{args.offset}"
            rec = k.read_at(args.topic, args.partition, args.offset) if low <= args.offset < high else None
            if rec is None or rec.offset != args.offset:
                raise ConfigError(f"no record at {where} (the partition holds offsets {low} to {high - 1})")
            out: dict[str, Any] = {
                "topic": rec.topic,
                "partition": rec.partition,
                "offset": rec.offset,
                "timestamp": _when(rec.timestamp_ms),
                "reason": reason_of(rec),
                "key": None if rec.key is None else rec.key.decode(errors="replace"),
                "headers": decoded_headers(rec.headers),
            }
            if args.payload:
                out["payload"] = _payload(rec.value)
            print(json.dumps(out, indent=2, ensure_ascii=False))
            return 0
    s = summarize(args.topic, read_topic(settings, args.topic))
    dropped = f" ({s.dropped} with the value dropped: not redrivable)" if s.dropped else ""
    print(f"{s.topic}: {s.total} dead letter(s){dropped}")
    if not s.total:
        return 0
    print("by reason:")
    _table([[f"  {k}", str(n)] for k, n in s.reasons.most_common()])
    print("by original topic:")
    _table([[f"  {k}", str(n)] for k, n in s.origins.most_common()])
    for label, rec in (("oldest", s.oldest), ("newest", s.newest)):
        if rec is not None:
            print(
                f"{label}: {_when(rec.timestamp_ms)}  partition {rec.partition} offset {rec.offset}"
                f"  ({reason_of(rec)})"
            )
    return 0


def _payload(value: bytes | None) -> object:
    if value is None:
        return None
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return "0x" + value.hex()


# -- redrive -------------------------------------------------------------------------------


def cmd_redrive(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.offsets import Kafka
    from consumers.redrive import Redrive, parse_where
    from storage.db import Database

    try:
        where = parse_where(args.where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    with Kafka(settings) as k:
        k.partitions(args.dlq)
    db = Database.from_settings(settings)
    try:
        run = Redrive(settings, db, args.dlq, chunk=args.chunk)
        if not args.dry_run:
            run.lock()
            recovered = run.recover()
            if recovered:
                print(f"finished {len(recovered)} record(s) a stopped redrive had taken:")
                _lines(recovered)
        records, report = run.plan(where, args.limit)
        skipped = [ln for ln in report.lines if ln.outcome == "value_dropped"]
        print(
            f"{args.dlq}: {len(records)} dead letter(s) to move; {report.done_before} taken by earlier "
            f"redrives; {report.filtered} left by the filter or --limit (still available)"
        )
        if skipped:
            print(f"skipped, value dropped (cannot be redriven): {len(skipped)}")
            _lines(skipped)
        if args.dry_run:
            _lines(run.preview(records))
            print("dry run: nothing changed")
            return 0
        if not records:
            return 0
        if not confirm(f"Move {len(records)} dead letter(s) back to their main topics?", args.yes):
            print("nothing changed")
            return 1
        bar = ProgressBar(len(records))
        lines = run.run(records, progress=bar.advance)
    finally:
        db.close()
    _lines(lines)
    moved = sum(1 for ln in lines if ln.outcome == "moved")
    sent = sum(1 for ln in lines if ln.outcome == "already_sent")
    print(f"moved {moved}; already sent (not moved) {sent}")
    return 0


def _lines(lines: list[Any]) -> None:
    for ln in lines:
        extra = f"  delivery {ln.delivery_id}" if ln.delivery_id else ""
        reason = f"  ({ln.reason})" if ln.reason else ""
        print(f"  {ln.outcome:<13} [{ln.partition}]@{ln.offset} -> {ln.target or '?'}{reason}{extra}")


# -- lag -----------------------------------------------------------------------------------


def cmd_lag(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.offsets import lag

    rows = lag(settings, args.group or None)
    if args.json:
        print(json.dumps([r.as_json() for r in rows]))
        return 0
    # The table leaves out partitions that never held a record and were never committed.
    rows = [r for r in rows if r.committed is not None or r.end > 0]
    if not rows:
        print("no consumer groups with offsets on herald's topics")
        return 0
    table = [["group", "topic", "partition", "committed", "end", "lag", "lag_seconds"]]
    for r in rows:
        committed = "-" if r.committed is None else str(r.committed)
        table.append(
            [r.group, r.topic, str(r.partition), committed, str(r.end), str(r.lag), f"{r.lag_seconds:.1f}"]
        )
    _table(table)
    return 0


# -- purge and forget ----------------------------------------------------------------------


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.offsets import parse_time
    from storage.retention import purge

    age = args.older_than.strip()
    wrong = ConfigError(f"--older-than {age!r}: give an age such as 90d, 36h or 45m")
    if age.startswith("-"):
        raise wrong
    try:
        cutoff = parse_time(f"-{age}")
    except ConfigError as exc:
        raise wrong from exc
    return _count_then_delete(
        settings,
        args,
        f"older than {cutoff.isoformat(timespec='seconds')}",
        lambda db, dry: purge(db, cutoff, batch=args.batch_size, dry_run=dry),
        "Delete them?",
        "deleted",
    )


def cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    from storage.retention import forget

    return _count_then_delete(
        settings,
        args,
        f"user {args.user}",
        lambda db, dry: forget(db, args.user, batch=args.batch_size, dry_run=dry),
        f"Erase everything herald keeps about {args.user}?",
        "removed",
    )


def _count_then_delete(
    settings: Settings,
    args: argparse.Namespace,
    what: str,
    delete: Callable[[Any, bool], dict[str, int]],
    question: str,
    done: str,
) -> int:
    """Count (a dry run of ``delete``), print, ask, then delete in batches and print what went."""
    from storage.db import Database

    db = Database.from_settings(settings)
    try:
        counts = delete(db, True)
        print(f"{what}: " + _counts(counts))
        if args.dry_run:
            print("dry run: nothing changed")
            return 0
        if not any(counts.values()):
            return 0
        if not confirm(question, args.yes):
            print("nothing changed")
            return 1
        print(f"{done}: " + _counts(delete(db, False)))
    finally:
        db.close()
    return 0


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items())


# -- parsers -------------------------------------------------------------------------------


def _change_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _quiet(cmd: Command) -> Command:
    """librdkafka logs every failed connection attempt; an operator command says it once."""

    def run(args: argparse.Namespace, settings: Settings) -> int:
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            KAFKA_LOG.setLevel(logging.CRITICAL)
        return cmd(args, settings)

    return run


def add_parsers(sub: Any) -> None:
    """Register the operator commands on ``herald``'s subparsers."""
    s = sub.add_parser(
        "replay",
        help="reset a stopped consumer group's offsets to a point in time, to read records again",
        description="Reset GROUP's committed offsets on each TOPIC to the first record at or after "
        "--from, printing per partition the current and new offset and how many records will be "
        "read again. The group must be stopped (refused while it has members). Replays are safe: "
        "notifications dedupe by idempotency key, deliveries by their row's state.",
        epilog=SETTINGS_NOTE,
    )
    s.add_argument("--group", required=True, help="consumer group, e.g. herald-ingest")
    s.add_argument("--topic", required=True, action="append", help="topic (repeatable)")
    s.add_argument(
        "--from",
        dest="from_",
        required=True,
        metavar="TIME",
        help="RFC 3339 (2026-11-25T09:00:00Z) or back from now (-90s, -30m, -2h, -1d)",
    )
    _change_flags(s)
    s.set_defaults(func=_quiet(cmd_replay))

    s = sub.add_parser(
        "dlq", help="inspect a dead-letter topic: counts by reason and origin, or one record decoded"
    )
    dsub = s.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dl = dsub.add_parser(
        "list", help="counts by reason and by original topic, oldest and newest", epilog=SETTINGS_NOTE
    )
    dl.add_argument("topic", help="e.g. herald.events.dlq or herald.deliveries.webhook.dlq")
    ds = dsub.add_parser(
        "show", help="one record's headers decoded (the payload only with --payload)", epilog=SETTINGS_NOTE
    )
    ds.add_argument("topic")
    ds.add_argument("--offset", type=int, required=True, metavar="N")
    ds.add_argument("--partition", type=int, default=0, metavar="P", help="default 0")
    ds.add_argument("--payload", action="store_true", help="print the record's value too (may be private)")
    s.set_defaults(func=_quiet(cmd_dlq))

    s = sub.add_parser(
        "redrive",
        help="move dead letters back to their main topic (events or the channel's deliveries)",
        description="Move records from a dead-letter topic back to the topic they failed on (a retry "
        "topic's go to the channel's main topic), with a progress bar, and print what moved. A failed "
        "delivery is set back to queued with a fresh attempt budget; one already sent is never sent "
        "again; a record whose value was dropped is listed and skipped. PostgreSQL records each moved "
        "record, so none moves twice, across a crash too; records the filter leaves stay available.",
        epilog=SETTINGS_NOTE,
    )
    s.add_argument("--dlq", required=True, metavar="TOPIC", help="the dead-letter topic")
    s.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="reason=X (herald-dlt-reason) or topic=X (original topic); repeatable, all must match",
    )
    s.add_argument("--limit", type=int, metavar="N", help="move at most N records (oldest first)")
    s.add_argument("--chunk", type=int, default=200, metavar="N", help=argparse.SUPPRESS)
    _change_flags(s)
    s.set_defaults(func=_quiet(cmd_redrive))

    s = sub.add_parser(
        "lag",
        help="per group, topic and partition: committed and end offsets, lag in records and seconds",
        description="Lag in records (end - committed) and in seconds (the age of the oldest unread "
        "record; on a retry topic counted from its due time; 0 when caught up). Without --group: "
        "every group with offsets on herald's topics. The table leaves out partitions that are "
        "empty and were never committed; --json lists every partition.",
        epilog=SETTINGS_NOTE,
    )
    s.add_argument("--group", action="append", metavar="G", help="only this group (repeatable)")
    s.add_argument(
        "--json",
        action="store_true",
        help='a list of {"group","topic","partition","committed","end","lag","lag_seconds"}',
    )
    s.set_defaults(func=_quiet(cmd_lag))

    s = sub.add_parser(
        "purge",
        help="delete old read or archived notifications (and their delivery rows) and old digest windows",
        description="Delete notifications created before the cutoff that are read or archived, with "
        "their delivery rows, and digest windows closed before it, with their items: in batches of "
        "short transactions that skip rows in use. Unread notifications are kept.",
        epilog=SETTINGS_NOTE,
    )
    s.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 90d, 36h")
    s.add_argument("--batch-size", type=int, default=1000, metavar="N", help="rows per transaction")
    _change_flags(s)
    s.set_defaults(func=_quiet(cmd_purge))

    s = sub.add_parser(
        "forget",
        help="erase a user: notifications, preferences, endpoints, delivery rows, digests",
        description="Erase everything herald's database keeps about USER, in batches, and print what "
        "was removed. Records on Kafka topics are not touched: see the README's erasure section.",
        epilog=SETTINGS_NOTE,
    )
    s.add_argument("user")
    s.add_argument("--batch-size", type=int, default=1000, metavar="N", help="rows per transaction")
    _change_flags(s)
    s.set_defaults(func=_quiet(cmd_forget))
