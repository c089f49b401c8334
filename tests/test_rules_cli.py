"""``herald rules check`` and ``herald rules test`` as an operator runs them: no broker, no database."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.helpers import herald_cli

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "samples"
SHIPPED = ROOT / "config" / "rules"


def herald(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    # Nothing listens here: these commands must not need a broker or a database.
    nowhere = {
        "HERALD_KAFKA_BOOTSTRAP": "127.0.0.1:9",
        "HERALD_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
    }
    return herald_cli(*args, env={**nowhere, **(env or {})}, stdin=stdin)


def github_header_args() -> list[str]:
    lines = (SAMPLES / "github_issue_comment.headers").read_text().splitlines()
    return [arg for line in lines if line for arg in ("--header", line)]


def test_rules_check_accepts_the_shipped_rules() -> None:
    out = herald("rules", "check", str(SHIPPED))
    assert out.returncode == 0, out.stderr
    assert "3 rule(s) OK" in out.stdout
    for f in SHIPPED.glob("*.toml"):
        assert herald("rules", "check", str(f)).returncode == 0


def test_rules_check_names_the_rule_and_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "github.toml"
    bad.write_text(
        (SHIPPED / "github.toml").read_text().replace("${repo}#${number}", "${repository}#${number}")
    )
    out = herald("rules", "check", str(bad))
    assert out.returncode == 2
    assert "rule 'github-issue-comment'" in out.stderr
    assert "emit 'author': title" in out.stderr and "${repository}" in out.stderr


def test_rules_test_prints_the_notifications_of_a_github_sample() -> None:
    out = herald(
        "rules", "test", str(SHIPPED), str(SAMPLES / "github_issue_comment.json"), *github_header_args()
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["via"] == "rule:github-issue-comment"
    notes = result["notifications"]
    assert [(n["user_id"], n["severity"], n["batch_key"]) for n in notes] == [
        ("octocat", "info", None),
        ("mona-lisa", "warning", "github:acme/widgets"),
        ("defunkt", "warning", "github:acme/widgets"),
    ]


def test_rules_test_reads_stdin_and_takes_a_topic() -> None:
    rules = SHIPPED / "jobs.toml"
    out = herald(
        "rules",
        "test",
        str(rules),
        "-",
        "--topic",
        "ci.events",
        stdin=(SAMPLES / "job_failed.json").read_text(),
    )
    assert out.returncode == 0, out.stderr
    (note,) = json.loads(out.stdout)["notifications"]
    # The default source is a stable name, never the topic (a mirrored topic dedupes the same).
    assert note["source"] == "events" and note["idempotency_key"].startswith("h:sha256:")
    named = herald(
        "rules",
        "test",
        str(rules),
        "-",
        "--header",
        "herald-source=ci",
        stdin=(SAMPLES / "job_failed.json").read_text(),
    )
    (note,) = json.loads(named.stdout)["notifications"]
    assert note["source"] == "ci"


def test_rules_test_says_why_a_sample_is_rejected() -> None:
    # The GitHub payload without its X-GitHub-Event header: nothing matches it.
    out = herald("rules", "test", str(SHIPPED), str(SAMPLES / "github_issue_comment.json"))
    assert out.returncode == 1
    rejected = json.loads(out.stdout)["rejected"]
    assert rejected["reason"] == "unmapped"
    out = herald("rules", "test", str(SHIPPED), str(SAMPLES / "job_failed.json"), "--header", "oops")
    assert out.returncode == 2 and "NAME=VALUE" in out.stderr


def test_ingest_with_an_invalid_rules_file_stops_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text((SHIPPED / "jobs.toml").read_text().replace('to = "owner"', 'to = "owners"'))
    out = herald("ingest", "--timeout", "5", env={"HERALD_RULES_FILE": str(bad)})
    assert out.returncode == 2
    assert "rule 'job-failed'" in out.stderr and "to" in out.stderr and "'owners'" in out.stderr
