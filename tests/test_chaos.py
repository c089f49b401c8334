"""``herald chaos``, the 60-second version: the whole pipeline on its own embedded stack,
every process of ``herald dev``, a steady load, a fault of every kind from a fixed seed (a
SIGKILL, a PostgreSQL stop, a provider outage, a rebalance, a replay), and every invariant
of the end state checked by the command itself (``herald/chaos/check.py``).

It runs as an operator runs it: the command line, its exit status, its report file and its
last printed line. ``HERALD_CHAOS_SEED`` picks another seed (the one printed by a failed
run reproduces it). The full soak is ``make chaos`` (5 minutes at 2,000 records/s).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from config.settings import Settings
from herald.chaos.check import _trace_missing
from herald.chaos.faults import schedule
from herald.chaos.load import Generator, Note, Sent, plan_users
from tests.helpers import produce

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("HERALD_CHAOS_SEED", "19"))
KINDS = {"kill", "provider", "postgres", "rebalance", "replay"}


@pytest.mark.slow
def test_a_minute_of_chaos_keeps_every_invariant(tmp_path: Path) -> None:
    report = tmp_path / "chaos-report.json"
    argv = [sys.executable, "-P", "-m", "herald", "chaos", "--duration", "60s", "--rate", "300"]
    argv += ["--users", "80", "--seed", str(SEED), "--report", str(report), "--folder", str(tmp_path / "run")]
    argv += ["--drain-timeout", "120s"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    done = subprocess.run(
        argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=280, check=False
    )
    out = done.stdout.strip().splitlines()
    assert out, done.stderr[-3000:]
    last = json.loads(out[-1])
    shown = "\n".join(line for line in out[:-1] if "INFO" not in line)[-6000:]
    assert done.returncode == 0 and last["invariants_failed"] == 0, f"{shown}\n{done.stderr[-2000:]}"

    assert json.loads(report.read_text()) == last, "the report file and the last line are the same object"
    for key in ("events", "faults", "invariants_failed", "p99_critical_ms", "peak_rss_mb"):
        assert key in last, key
    assert set(last["faults"]) == KINDS, "one fault of every kind ran"
    assert last["seed"] == SEED and f"--seed {SEED}" in out[0], "the seed is printed to reproduce the run"
    names = {i["name"] for i in last["invariants"]}
    assert {"events_exactly_once", "duplicates_accounted", "lag_zero", "metrics_match_database"} <= names
    # The load really was what the command says: accepted, duplicated, malformed, delivered.
    counts = last["counts"]
    assert last["events"] > 0.9 * 60 * 300
    assert counts["duplicates_sent"] > 0.15 * counts["records"]
    assert counts["malformed"] > 0 and counts["poison"] > 0 and counts["via_receiver"] > 0
    assert set(counts["by_kind"]) >= {"native", "cloudevent", "stripe", "github"}
    assert all(counts["accepted_by_peers"].get(p, 0) > 0 for p in ("webhook", "email", "push"))
    replay = next(f for f in last["fault_list"] if f["kind"] == "replay")
    assert replay["reread"] and replay["reread"] > 0, "the replay read records again"
    assert all(0 < mb < 200 for mb in last["peak_rss_mb"].values()), last["peak_rss_mb"]


def test_a_seed_gives_the_same_faults_users_and_records() -> None:
    def draw(seed: int) -> tuple[list[str], list[object], list[bytes | None]]:
        rng = random.Random(seed)  # noqa: S311 (the run's seed, not a secret)
        faults = [f"{f.name}@{f.at_s:.3f}+{f.hold_s:.3f}" for f in schedule(rng, 300)]
        users = plan_users(rng, 30)
        gen = Generator(rng, users)
        return faults, list(users), [gen.next(1_800_000_000.0).value for _ in range(500)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_every_fault_kind_is_drawn_and_each_is_due_before_the_last_fifth() -> None:
    for seed in range(20):
        faults = schedule(random.Random(seed), 60)  # noqa: S311
        assert {f.kind for f in faults} == KINDS
        assert all(f.at_s <= 0.8 * 60 for f in faults if f.kind != "replay")
        assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)
    assert len(schedule(random.Random(1), 300)) == 15  # noqa: S311 (one per 20 s of a 5-minute run)


def test_chaos_help_and_a_bad_option_are_one_line() -> None:
    run = [sys.executable, "-P", "-m", "herald", "chaos"]
    shown = subprocess.run([*run, "--help"], capture_output=True, text=True, check=False, cwd=ROOT)
    assert shown.returncode == 0
    for option in ("--duration", "--rate", "--seed", "--report"):
        assert option in shown.stdout
    bad = subprocess.run([*run, "--duration", "10s"], capture_output=True, text=True, check=False, cwd=ROOT)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_missing_notification_is_traced_to_what_the_broker_holds(settings: Settings) -> None:
    """The check says, for each record behind a missing notification, whether the broker holds
    it at the position it acknowledged: lost before ingest, or by it."""
    # One key, one partition: the acks come in the order sent.
    first, second = produce(settings, [b'{"first": 1}', b'{"second": 2}'], key=b"one")
    note = Note("u1", "k:1", "info")
    sent = [
        Sent("native", b'{"first": 1}', [], (note,), sent_at=10.0, position=first[1:]),
        Sent("native", b'{"other": 3}', [], (note,), sent_at=11.5, position=second[1:]),
        Sent("native", b'{"gone": 4}', [], (note,), sent_at=12.0, position=(second[1], second[2] + 50)),
        Sent("native", b'{"unrelated": 5}', [], (Note("u2", "k:2", "info"),), position=first[1:]),
    ]
    traced = _trace_missing(settings, SimpleNamespace(sent=sent), [("u1", "k:1")])  # type: ignore[arg-type]
    assert [t["broker_holds"] for t in traced] == ["it", "another record", "nothing"]
    assert traced[1]["sent_at_s"] == 1.5 and traced[0]["note"] == ["u1", "k:1"]
