"""``herald replay``: the outage runbook end to end, a dry run, the prompt, and refusals.

The outage: deliveries stop while events keep coming; the operator stops ingest, replays
the events topic (and the delivery topic) from before the outage, restarts everything,
and the pipeline ends with zero duplicate notifications and zero duplicate sends.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter

import psycopg
import pytest

from config.settings import Settings
from herald.inspect import read_topic, wait_committed, wait_group_stable
from producers.topics import Topics, ensure_topics
from tests.conftest import Backend
from tests.helpers import start_ingest
from tests.ops_support import group_offsets, new_group, produce_single, run, set_offsets
from tests.test_deliver import critical, deliver_settings, peer, start_deliver, user_with
from tests.webhook_peer import WebhookPeer

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[tuple[object, ...]]
__all__ = ["peer"]  # the fixture, used by name


def _reread(out: str) -> int:
    m = re.search(r"^(\d+) record\(s\) will be read again$", out, re.M)
    assert m, out
    return int(m.group(1))


def _ends(settings: Settings, topic: str) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for r in read_topic(settings, topic, timeout=20):
        out[(r.topic, r.partition)] = max(r.offset, out.get((r.topic, r.partition), -1))
    return out


def test_replay_after_an_outage_sends_and_stores_nothing_twice(
    db: Conn, backend: Backend, peer: WebhookPeer
) -> None:
    s = deliver_settings(backend)
    topics = Topics(s.topic_prefix)
    ensure_topics(s, topics.ingest_topics())
    user_with(db, s, "opsuser", peer.url("/ok"))
    ingest_group, deliver_group = new_group("ingest"), new_group("deliver")
    hour_ago = int(time.time() * 1000) - 3_600_000
    events = [critical("opsuser", id=f"e{i}-{uuid.uuid4().hex[:6]}") for i in range(8)]
    values = [json.dumps(e).encode() for e in events]

    # An hour ago, all was well: four events ingested and delivered.
    ingest = start_ingest(s, ingest_group)
    deliver = start_deliver(s, deliver_group)
    produce_single(s, topics.events, values[:4], timestamps_ms=[hour_ago + i * 60_000 for i in range(4)])
    peer.wait_for("/ok", 4)
    # The outage: deliveries stop; four more events come in and are stored.
    deliver.stop()
    ends = produce_single(s, topics.events, values[4:], timestamps_ms=[hour_ago + 1_800_000] * 4)
    wait_committed(s, ingest_group, {(topics.events, 0): ends[-1]})
    ingest.stop()

    # The operator replays both groups from before the outage (one by --yes, one at the prompt).
    r1 = run(s, "replay", "--group", ingest_group, "--topic", topics.events, "--from", "-2h", "--yes")
    assert r1.returncode == 0, r1.stderr
    assert _reread(r1.stdout) == 8
    main = topics.deliveries("webhook")
    r2 = run(s, "replay", "--group", deliver_group, "--topic", main, "--from", "-2h", stdin="y\n")
    assert r2.returncode == 0, r2.stderr + r2.stdout
    assert _reread(r2.stdout) == 4, "the four delivered before the outage are read again"
    assert "offsets of" in r2.stdout and "reset" in r2.stdout

    ingest = start_ingest(s, ingest_group)
    deliver = start_deliver(s, deliver_group)
    try:
        peer.wait_for("/ok", 8)
        wait_committed(s, ingest_group, {(topics.events, 0): ends[-1]})
        wait_committed(s, deliver_group, _ends(s, main))
        time.sleep(1.0)  # room for a duplicate send to show up, were there one
    finally:
        deliver.stop()
        ingest.stop()

    sends = peer.ids("/ok", status=None)
    assert len(sends) == 8 and set(sends.values()) == {1}, f"duplicate sends: {sends}"
    stored = db.execute("SELECT count(*) FROM notifications WHERE user_id = 'opsuser'").fetchone()
    assert stored == (8,)
    rows = db.execute(
        "SELECT status, attempts, count(*) FROM deliveries WHERE user_id = 'opsuser' GROUP BY 1, 2"
    ).fetchall()
    assert rows == [("sent", 1, 8)]
    # Ingest published no second delivery record (the rows were published already); the
    # deliverer read the first four again and skipped them: their rows said sent.
    copies = Counter(json.loads(r.value or b"")["delivery_id"] for r in read_topic(s, main, timeout=20))
    assert len(copies) == 8 and set(copies.values()) == {1}


def test_dry_run_prompt_and_refusals_change_nothing(settings: Settings) -> None:
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.ingest_topics())
    now = int(time.time() * 1000)
    produce_single(settings, topics.events, [b"not json"] * 3, timestamps_ms=[now - 5_400_000] * 3)
    group = new_group("replay")
    set_offsets(settings, group, {(topics.events, 0): 3, (topics.events, 1): 0})
    before = group_offsets(settings, group)
    args = ("replay", "--group", group, "--topic", topics.events, "--from", "-2h")

    dry = run(settings, *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert _reread(dry.stdout) == 3 and "dry run: nothing changed" in dry.stdout
    lines = dry.stdout.splitlines()
    assert lines[1].split() == ["topic", "partition", "current", "->", "new", "end", "re-read"]
    assert lines[2].split() == [topics.events, "0", "3", "->", "0", "3", "3"]
    for answer in ("", "n\n", "whatever\n"):
        no = run(settings, *args, stdin=answer)
        assert no.returncode == 1 and "nothing changed" in no.stdout
        assert "[y/N]" in no.stderr
    assert group_offsets(settings, group) == before

    # An active group: refused, naming the fix; nothing changes.
    ingest = start_ingest(settings, group)
    try:
        wait_group_stable(settings, group, timeout=30)
        refused = run(settings, *args, "--yes")
        assert refused.returncode == 1
        assert "stop its consumers first" in refused.stderr
        assert refused.stderr.strip().count("\n") == 0
        shown = run(settings, *args, "--dry-run")
        assert shown.returncode == 0 and "stop its consumers first" in shown.stdout
    finally:
        ingest.stop()
    assert group_offsets(settings, group) == before

    done = run(settings, *args, "--yes")
    assert done.returncode == 0, done.stderr
    assert group_offsets(settings, group)[(topics.events, 0)] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--from", "yesterday"), "--from 'yesterday': give an RFC 3339 time"),
        (("--from", "-1h", "--topic", "no.such.topic"), "unknown topic 'no.such.topic'"),
        (("--from", "-1h", "--group", "no-such-group"), "unknown consumer group 'no-such-group'"),
    ],
)
def test_replay_errors_are_one_line(settings: Settings, args: tuple[str, ...], message: str) -> None:
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, [topics.events])
    group = new_group("replay-err")
    set_offsets(settings, group, {(topics.events, 0): 0})
    given = dict(zip(args[::2], args[1::2], strict=True))
    argv = ["replay", "--group", given.get("--group", group), "--topic", given.get("--topic", topics.events)]
    done = run(settings, *argv, "--from", given["--from"], "--yes")
    assert done.returncode == 2
    assert message in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr


def test_help_names_every_option() -> None:
    from tests.helpers import herald_cli

    for cmd, flags in {
        "replay": ["--group", "--topic", "--from", "--dry-run", "--yes"],
        "redrive": ["--dlq", "--where", "--limit", "--dry-run", "--yes"],
        "lag": ["--group", "--json"],
        "purge": ["--older-than", "--dry-run", "--yes"],
        "forget": ["--dry-run", "--yes"],
    }.items():
        out = herald_cli(cmd, "--help", env={})
        assert out.returncode == 0 and all(f in out.stdout for f in flags), (cmd, out.stdout)
    for action in ("list", "show"):
        out = herald_cli("dlq", action, "--help", env={})
        assert out.returncode == 0
