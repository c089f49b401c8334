"""The end state of a chaos run, checked against what was sent (``load.py`` wrote down what
each record must become), what the peers accepted, and the faults injected.

Each check returns pass or fail with the figures behind it; a failure names a few examples.
"""

from __future__ import annotations

import json
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from api.auth import mint
from config.settings import Settings
from consumers.offsets import Kafka, lag
from consumers.reading import read_topic
from herald.chaos.faults import Fault
from herald.chaos.load import EVENT_SOURCE, Load, UserPlan
from herald.chaos.peers import Peers
from herald.chaos.watch import Watcher
from herald.processes import PROVIDERS, herald_groups
from producers.topics import Topics

FINAL = ("sent", "failed", "skipped", "digested", "suppressed")
# The most notifications one record of the load becomes (a recipients list, a GitHub comment).
MAX_FANOUT = 3
CE_SOURCE = "/chaos/jobs"


@dataclass
class Invariant:
    name: str
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, **self.detail}


@dataclass
class Result:
    invariants: list[Invariant]
    latency: dict[str, Any]
    duplicates: dict[str, Any]
    metrics: dict[str, Any]
    counts: dict[str, Any]


def _offset(headers: dict[str, bytes]) -> tuple[int, int]:
    part = headers.get("kafka_dlt-original-partition", b"")
    off = headers.get("kafka_dlt-original-offset", b"")
    return (
        int.from_bytes(part, "big", signed=True) if len(part) == 4 else -1,
        int.from_bytes(off, "big", signed=True) if len(off) == 8 else -1,
    )


def run(
    settings: Settings,
    *,
    load: Load,
    plans: Sequence[UserPlan],
    peers: Peers,
    watcher: Watcher,
    faults: Sequence[Fault],
    readers: set[str],
    drained: bool,
    run_window: tuple[float, float],
) -> Result:
    url = settings.database_url.get_secret_value()
    inv: list[Invariant] = []
    with psycopg.connect(url) as conn:
        notes = {
            (str(r[0]), str(r[1])): (str(r[2]), str(r[3]), r[4], r[5], bool(r[6]), str(r[7]))
            for r in conn.execute(
                "SELECT user_id, idempotency_key, severity, id::text, extract(epoch FROM occurred_at),"
                " extract(epoch FROM created_at), hidden, source FROM notifications"
            )
        }
        deliveries = {
            str(r[0]): (r[1] and str(r[1]), str(r[2]), str(r[3]), str(r[4]), r[5], str(r[6]), r[7])
            for r in conn.execute(
                "SELECT id::text, notification_id::text, user_id, channel, status, status_reason, route,"
                " extract(epoch FROM published_at) FROM deliveries"
            )
        }
        # The first send of each delivery (the deliverer's clock as it began the request).
        first_send = {
            str(r[0]): float(r[1])
            for r in conn.execute(
                "SELECT delivery_id::text, extract(epoch FROM min(started_at)) FROM delivery_attempts"
                " WHERE endpoint_id <> 0 GROUP BY delivery_id"
            )
        }
        windows = {
            str(r[0]): (str(r[1]), str(r[2]), str(r[3]))
            for r in conn.execute("SELECT id::text, user_id, channel, status FROM digest_windows")
        }

    inv += _accepted(settings, load, notes)
    inv += _delivery_rows(settings, plans, notes, deliveries)

    # 5. Sent rows reached their provider; nothing reached a provider that is not sent.
    accepted = peers.accepted()
    seen: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in accepted:
        seen[str(a["id"])].append(a)
    sent_ids = {did for did, d in deliveries.items() if d[3] == "sent"}
    unseen = [did for did in sent_ids if did not in seen]
    phantom = [i for i in seen if i not in sent_ids]
    inv.append(
        Invariant(
            "sent_means_accepted",
            not unseen and not phantom,
            {
                "sent_rows": len(sent_ids),
                "accepted": len(accepted),
                "sent_not_accepted": len(unseen),
                "accepted_not_sent": len(phantom),
                "examples": (unseen + phantom)[:5],
            },
        )
    )

    # 6. Each digest window went out once (or was suppressed); none left open.
    w_status = Counter(w[2] for w in windows.values())
    w_sent = [wid for wid, w in windows.items() if w[2] == "sent"]
    w_bad = [wid for wid in w_sent if deliveries.get(wid, ("",) * 6)[3] not in ("sent", "failed", "skipped")]
    w_multi = [wid for wid in w_sent if len(seen.get(wid, [])) > 1]
    inv.append(
        Invariant(
            "digests_once",
            not w_bad and w_status.get("open", 0) == 0,
            {"windows": dict(w_status), "sent_without_delivery": len(w_bad), "sent_twice": len(w_multi)},
        )
    )

    # 7. Duplicates at the providers: each within the send-once window of a fault.
    dups = _duplicates(seen, faults, settings.delivery.lease_s, settings.delivery.concurrency)
    inv.append(Invariant("duplicates_accounted", dups["unattributed"] == 0 and dups["over_bound"] == 0, dups))

    # 8. Unread counts through the API match the rows.
    inv.append(_unread(settings, sorted(readers)[:15] + [p.user for p in plans[:10]]))

    # 9. Lag back to 0 on every herald group.
    rows = lag(settings, herald_groups())
    behind = [r.as_json() for r in rows if r.lag > 0]
    inv.append(Invariant("lag_zero", drained and not behind, {"drained": drained, "behind": behind[:5]}))

    # 10. Metrics against the database, within what killed or stopped processes lost.
    metrics = _metrics(watcher, notes, deliveries, windows, settings.batch_size)
    inv.append(
        Invariant("metrics_match_database", all(m["ok"] for m in metrics.values()), {"by_metric": metrics})
    )

    # 11. The peers never saw a bad signature or an undecryptable push.
    stats = peers.stats()
    bad = {p: stats[p].get("bad_signatures", 0) + stats[p].get("refused", 0) for p in PROVIDERS}
    inv.append(Invariant("signatures_valid", not any(bad.values()), {"bad": bad}))

    # 12. The load itself: every record acknowledged, every fault injected.
    fault_errors = [f.name + ": " + f.error for f in faults if f.error]
    inv.append(
        Invariant(
            "load_and_faults_ran",
            not load.failures and not fault_errors,
            {"producer_failures": load.failures[:3], "fault_errors": fault_errors},
        )
    )

    latency = _latency(notes, deliveries, first_send, seen, faults, run_window)
    counts = {
        "records": len(load.sent),
        "accepted": sum(1 for s in load.sent if s.position is not None),
        "via_receiver": sum(1 for s in load.sent if s.via_receiver),
        "receiver_unconfirmed": sum(1 for s in load.sent if s.unconfirmed),
        "receiver_dropped_at_stop": sum(1 for s in load.sent if s.dropped),
        "duplicates_sent": sum(1 for s in load.sent if s.duplicate),
        "malformed": sum(1 for s in load.sent if s.kind == "malformed"),
        "poison": sum(1 for s in load.sent if s.kind == "poison"),
        "by_kind": dict(Counter(s.kind for s in load.sent)),
        "notifications": len(notes),
        "deliveries": len(deliveries),
        "digest_windows": len(windows),
        "accepted_by_peers": dict(Counter(a["provider"] for a in accepted)),
    }
    return Result(inv, latency, dups, metrics, counts)


def _accepted(settings: Settings, load: Load, notes: dict[tuple[str, str], Any]) -> list[Invariant]:
    """Invariants 1 and 2: what every accepted record became."""
    topics = Topics(settings.topic_prefix)
    inv: list[Invariant] = []
    # 1. Every accepted event: exactly one notification per (user, key), or a dead letter.
    expected: dict[tuple[str, str], str] = {}
    maybe: set[tuple[str, str]] = set()  # from a receiver request that never got its 202
    malformed: dict[tuple[int, int], str] = {}
    valid_positions: set[tuple[int, int]] = set()
    for s in load.sent:
        if s.position is None and not s.unconfirmed:
            continue
        if s.dlq_reason is not None:
            if s.position is not None:
                malformed[s.position] = s.dlq_reason
            continue
        for n in s.notes:
            if s.position is not None:
                expected.setdefault((n.user, n.key), n.severity)
            else:
                maybe.add((n.user, n.key))
        if s.position is not None:
            valid_positions.add(s.position)
    stored = set(notes)
    missing = [k for k in expected if k not in stored]
    extra = [k for k in stored if k not in expected and k not in maybe]
    wrong = [k for k, sev in expected.items() if k in notes and notes[k][0] != sev]
    inv.append(
        Invariant(
            "events_exactly_once",
            not missing and not extra and not wrong,
            {
                "expected": len(expected),
                "stored": len(stored),
                "missing": len(missing),
                "unexpected": len(extra),
                "wrong_severity": len(wrong),
                "unconfirmed_stored": len(maybe & stored - set(expected)),
                "examples": [list(k) for k in (missing + extra + wrong)[:5]],
                "missing_records": _trace_missing(settings, load, missing[:5]),
            },
        )
    )

    # 2. Every accepted malformed or poison record: dead-lettered with its reason.
    dead = read_topic(settings, topics.events_dlq, timeout=60)
    by_origin: dict[tuple[int, int], list[str]] = defaultdict(list)
    for rec in dead:
        by_origin[_offset(rec.headers)].append(rec.headers.get("herald-dlt-reason", b"").decode())
    lost = [p for p in malformed if p not in by_origin]
    wrong_reason = [p for p, r in malformed.items() if p in by_origin and set(by_origin[p]) != {r}]
    valid_dead = [p for p in valid_positions if p in by_origin]
    copies = sum(len(v) - 1 for p, v in by_origin.items() if p in malformed)
    inv.append(
        Invariant(
            "malformed_dead_lettered",
            not lost and not wrong_reason and not valid_dead,
            {
                "malformed_accepted": len(malformed),
                "dead_letters": len(dead),
                "reasons": dict(Counter(r for v in by_origin.values() for r in v)),
                "missing": len(lost),
                "wrong_reason": len(wrong_reason),
                "valid_dead_lettered": len(valid_dead),
                "copies": copies,  # a replay or a killed ingest re-reads them: at-least-once
            },
        )
    )

    return inv


def _trace_missing(settings: Settings, load: Load, missing: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """For a missing notification, the records that should have made it, and what the broker
    holds at the position it acknowledged for each (the same bytes, another record, or
    nothing): whether the record was lost before ingest or by it."""
    out: list[dict[str, Any]] = []
    if not missing:
        return out
    wanted = set(missing)
    topic = Topics(settings.topic_prefix).events
    started = load.sent[0].sent_at if load.sent else 0.0
    with Kafka(settings) as k:
        for s in load.sent:
            hit = [n for n in s.notes if (n.user, n.key) in wanted]
            if not hit or s.position is None:
                continue
            rec = k.read_at(topic, *s.position)  # the first record at or after it
            if rec is None or rec.offset != s.position[1]:
                holds = "nothing"
            else:
                holds = "it" if (rec.value or b"") == s.value else "another record"
            out.append(
                {
                    "note": [hit[0].user, hit[0].key],
                    "kind": s.kind,
                    "via_receiver": s.via_receiver,
                    "duplicate": s.duplicate,
                    "sent_at_s": round(s.sent_at - started, 1),
                    "position": list(s.position),
                    "broker_holds": holds,
                }
            )
            if len(out) == 10:
                break
    return out


def _delivery_rows(
    settings: Settings,
    plans: Sequence[UserPlan],
    notes: dict[tuple[str, str], Any],
    deliveries: dict[str, Any],
) -> list[Invariant]:
    """Invariants 3 and 4: the fan-out, and every row final."""
    topics = Topics(settings.topic_prefix)
    inv: list[Invariant] = []
    # 3. Fan-out: each warning or critical has one delivery row per channel the user enabled.
    plan = {p.user: p for p in plans}
    rows_by_note: dict[str, list[str]] = defaultdict(list)
    for d in deliveries.values():
        if d[0]:
            rows_by_note[d[0]].append(d[2])
    fan_bad: list[Any] = []
    checked = 0
    for (user, _key), (sev, nid, *_rest) in notes.items():
        want = sorted(plan[user].channels) if sev in ("warning", "critical") and user in plan else []
        got = sorted(rows_by_note.get(nid, []))
        checked += 1
        if got != want:
            fan_bad.append([user, sev, want, got])
    inv.append(
        Invariant(
            "fanout_complete",
            not fan_bad,
            {
                "notifications": checked,
                "rows": len(deliveries),
                "wrong": len(fan_bad),
                "examples": fan_bad[:5],
            },
        )
    )

    # 4. Every delivery row final; every failed one dead-lettered with a reason.
    status = Counter(d[3] for d in deliveries.values())
    open_rows = [did for did, d in deliveries.items() if d[3] not in FINAL]
    failed = {did for did, d in deliveries.items() if d[3] == "failed"}
    dlq_ids: dict[str, str] = {}
    for channel in PROVIDERS:
        for rec in read_topic(settings, topics.deliveries_dlq(channel), timeout=60):
            try:
                did = str(json.loads(rec.value or b"{}").get("delivery_id"))
            except ValueError:
                continue
            dlq_ids[did] = rec.headers.get("herald-dlt-reason", b"").decode()
    undead = [did for did in failed if not dlq_ids.get(did)]
    inv.append(
        Invariant(
            "deliveries_final",
            not open_rows and not undead,
            {
                "status": dict(status),
                "not_final": len(open_rows),
                "failed_without_dead_letter": len(undead),
                "dead_letter_reasons": dict(Counter(dlq_ids.values())),
            },
        )
    )

    return inv


def _duplicates(
    seen: dict[str, list[dict[str, Any]]], faults: Sequence[Fault], lease_s: float, concurrency: int
) -> dict[str, Any]:
    """Each id accepted twice or more must follow a fault that can cause it: a kill of that
    channel's deliverer (the send-once window), a rebalance of its group (an instance that
    leaves gives back the sends it abandoned, which the next owner sends again), or a
    PostgreSQL outage (the outcome could not be recorded), under way between its first
    acceptance and the next."""
    by_fault: Counter[str] = Counter()
    unattributed: list[Any] = []
    total = 0
    for did, accs in seen.items():
        if len(accs) < 2:
            continue
        times = sorted(a["at"] for a in accs)
        provider = accs[0]["provider"]
        for first, again in zip(times, times[1:], strict=False):
            total += 1
            cause = next(
                (
                    f
                    for f in faults
                    if f.started
                    # The fault was under way at some point between the two acceptances
                    # (a rebalance's instance leaves, abandoning its sends, when it ends).
                    and f.started <= again
                    and (f.recovered or again) >= first - 1.0
                    and (
                        f.kind == "postgres"
                        or (f.kind in ("kill", "rebalance") and f.target == f"deliver-{provider}")
                    )
                ),
                None,
            )
            if cause is None:
                unattributed.append({"id": did, "provider": provider, "at": [first, again]})
            else:
                by_fault[cause.name + f"@{cause.started:.0f}"] += 1
    bound = 2 * concurrency
    over = [k for k, v in by_fault.items() if v > bound]
    return {
        "total": total,
        "by_fault": dict(by_fault),
        "unattributed": len(unattributed),
        "unattributed_examples": unattributed[:5],
        "bound_per_fault": bound,
        "over_bound": len(over),
    }


def _unread(settings: Settings, users: list[str]) -> Invariant:
    url = settings.database_url.get_secret_value()
    base = f"http://{settings.api.host}:{settings.api.port}"
    wrong = []
    with psycopg.connect(url) as conn:
        for user in dict.fromkeys(users):
            row = conn.execute(
                "SELECT count(*) FROM notifications WHERE user_id = %s AND read_at IS NULL"
                " AND archived_at IS NULL AND NOT hidden",
                (user,),
            ).fetchone()
            req = urllib.request.Request(  # noqa: S310 (loopback http)
                f"{base}/v1/notifications/unread-count",
                headers={"Authorization": f"Bearer {mint(settings.api, user)}"},
            )
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
                api = int(json.loads(resp.read())["count"])
            if row is None or api != int(row[0]):
                wrong.append([user, api, row[0] if row else None])
    return Invariant("unread_counts_match", not wrong, {"users": len(set(users)), "wrong": wrong[:5]})


def _metrics(
    watcher: Watcher,
    notes: dict[Any, Any],
    deliveries: dict[str, Any],
    windows: dict[str, Any],
    batch_size: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def compare(name: str, db: int, metric: float, stopped: int) -> None:
        """A process counts its work after making it durable, so a killed or stopped one may
        take uncounted work with it, never count what did not happen: at most the batch it
        was applying and the one it had prepared (ingest overlaps them), each of up to
        ``batch_size`` records of up to MAX_FANOUT notifications."""
        diff = db - int(metric)
        allowed = stopped * 2 * batch_size * MAX_FANOUT
        out[name] = {
            "database": db,
            "metrics": int(metric),
            "difference": diff,
            "stopped_instances": stopped,
            "allowed": allowed,
            "ok": 0 <= diff <= allowed,
        }

    inserted, stopped = watcher.counter("herald_ingest_events", "inserted", kinds=("ingest",))
    compare("notifications", len(notes), inserted, stopped)
    for channel in PROVIDERS:
        sent, stopped = watcher.counter(
            "herald_deliver_outcomes", channel, "sent", kinds=(f"deliver-{channel}",)
        )
        db = sum(1 for d in deliveries.values() if d[2] == channel and d[3] == "sent")
        compare(f"sent_{channel}", db, sent, stopped)
    digests = 0.0
    stopped_d = 0
    for channel in PROVIDERS:
        n, s = watcher.counter("herald_digests", channel, "sent", kinds=("digest",))
        digests += n
        stopped_d = s
    compare("digests_sent", sum(1 for w in windows.values() if w[2] == "sent"), digests, stopped_d)
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


# The stages of a critical's trip the report splits its latency into (see _latency).
STAGES = (
    "record_to_stored",
    "stored_to_provider",
    "stored_to_published",
    "published_to_sending",
    "sending_to_provider",
)


SLOWEST = 12

# The first seconds of load are left out of the percentiles and reported apart: the
# consumers' first fetches after their group join (on the embedded broker about half a
# second) are start-up, not the steady state the target is about ("herald bench ingest"
# leaves out its first 2 s the same way).
WARMUP_S = 5.0


def _latency(
    notes: dict[tuple[str, str], Any],
    deliveries: dict[str, Any],
    first_send: dict[str, float],
    seen: dict[str, list[dict[str, Any]]],
    faults: Sequence[Fault],
    run_window: tuple[float, float],
) -> dict[str, Any]:
    """Criticals sent at once (not rate-limited into a digest) of native and CloudEvents
    records, whose time is the moment the load made them (its producer sends it within
    LOAD_LINGER_MS, 50 ms, and that counts): from there to the peer's acceptance. Outside
    outage windows: a critical whose life overlaps a fault, from its start until the lag
    drained after it, is left out (and counted). So is one made in the first WARMUP_S seconds
    of load (counted, and its maximum reported).

    Where the time goes, split at three points: the notification's insert (the start of
    ingest's transaction), its delivery row marked published (the start of ingest's mark
    transaction, after the broker acknowledged the delivery record), and the deliverer
    beginning its first request. The deliverer may read a record before ingest marks its row,
    so the third stage can be negative."""
    by_id = {v[1]: (v[0], v[2], v[3], v[5]) for v in notes.values()}
    windows = [(f.started, f.drained or run_window[1] + 3600) for f in faults if f.started]
    outside: list[float] = []
    inside: list[float] = []
    warmup: list[float] = []
    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    trips: list[tuple[float, float, float, float | None, float | None, float]] = []
    for did, accs in seen.items():
        d = deliveries.get(did)
        if d is None or d[5] != "immediate" or not d[0]:
            continue
        note = by_id.get(d[0])
        if note is None or note[0] != "critical" or note[3] not in (EVENT_SOURCE, CE_SOURCE):
            continue
        occurred, created = float(note[1]), float(note[2])
        at = min(a["at"] for a in accs)
        ms = (at - occurred) * 1000
        if any(start <= at and occurred <= end for start, end in windows):
            inside.append(ms)
            continue
        if occurred < run_window[0] + WARMUP_S:
            warmup.append(ms)
            continue
        outside.append(ms)
        published, sending = d[6], first_send.get(did)
        trips.append((ms, occurred, created, published, sending, at))
        stages["record_to_stored"].append((created - occurred) * 1000)
        stages["stored_to_provider"].append((at - created) * 1000)
        if published is not None and sending is not None:
            stages["stored_to_published"].append((float(published) - created) * 1000)
            stages["published_to_sending"].append((sending - float(published)) * 1000)
            stages["sending_to_provider"].append((at - sending) * 1000)
    out: dict[str, Any] = {
        "criticals_outside_faults": len(outside),
        "criticals_during_faults": len(inside),
        "p50_ms": _pct(outside, 0.5),
        "p95_ms": _pct(outside, 0.95),
        "p99_ms": _pct(outside, 0.99),
        "max_ms": _pct(outside, 1.0),
        "during_faults_p99_ms": _pct(inside, 0.99),
        "criticals_warmup": len(warmup),
        "warmup_max_ms": _pct(warmup, 1.0),
    }
    for stage, values in stages.items():
        out[f"{stage}_p50_ms"] = _pct(values, 0.5)
        out[f"{stage}_p99_ms"] = _pct(values, 0.99)

    def marks(t: tuple[float, float, float, float | None, float | None, float]) -> dict[str, Any]:
        ms, occurred, created, published, sending, at = t
        points = [created, published, sending, at]
        return {
            "at_s": round(occurred - run_window[0], 1),
            "ms": round(ms),
            # milliseconds from the record to each mark: stored, published, sending, accepted
            "marks_ms": [None if p is None else round((float(p) - occurred) * 1000) for p in points],
        }

    # The slowest trips outside faults, to see whether the tail gathers at some moment.
    out["slowest"] = [marks(t) for t in sorted(trips, reverse=True)[:SLOWEST]]
    return out
