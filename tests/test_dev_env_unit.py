"""``herald --config FILE dev`` hands the file to every child; the dev stack's addresses still win (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from config.settings import Settings, load_settings
from herald.dev import child_environment

FILE = """
kafka_bootstrap = "prod-broker:9092"
database_url = "postgresql://prod/herald"
topic_prefix = "acme"
batch_size = 321
[policy]
digest_minutes = 11
"""


pytestmark = pytest.mark.usefixtures("no_herald_env")


def dev_settings(path: Path) -> Settings:
    """What run_dev makes of the file: the embedded broker and database replace its addresses."""
    return load_settings(path).model_copy(
        update={"kafka_bootstrap": "127.0.0.1:40001", "database_url": SecretStr("postgresql://dev/db")}
    )


def as_child(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """The settings a child reads at start-up, as ``main`` does (no --config)."""
    for name, value in env.items():
        if name.startswith("HERALD_"):
            monkeypatch.setenv(name, value)
    return load_settings(None)


def test_children_read_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "herald.toml"
    path.write_text(FILE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    env = child_environment({"PATH": "/bin"}, dev_settings(path), "herald.toml")

    assert env["HERALD_CONFIG_FILE"] == str(path)  # absolute, from a relative --config
    assert env["PATH"] == "/bin"
    child = as_child(monkeypatch, env)
    assert child.batch_size == 321
    assert child.policy.digest_minutes == 11
    assert child.topic_prefix == "acme"
    # The dev stack's own addresses win over the file's (env beats TOML).
    assert child.kafka_bootstrap == "127.0.0.1:40001"
    assert child.database_url.get_secret_value() == "postgresql://dev/db"


def test_without_config_the_inherited_environment_is_kept(tmp_path: Path) -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:40001")
    env = child_environment({"HERALD_CONFIG_FILE": "/etc/herald.toml"}, settings, None)
    assert env["HERALD_CONFIG_FILE"] == "/etc/herald.toml"
    assert env["HERALD_KAFKA_BOOTSTRAP"] == "127.0.0.1:40001"


def test_the_dev_scrape_config_names_every_process_and_passes_promtool(tmp_path: Path) -> None:
    import shutil
    import subprocess

    import yaml

    from herald.dev import ALERT_RULES, job_name, prometheus_config

    assert [job_name(n) for n in ("ingest-1", "ingest-2", "deliver-email", "lag-exporter")] == [
        "herald-ingest",
        "herald-ingest",
        "herald-deliver-email",
        "herald-lag-exporter",
    ]
    rules = tmp_path / "alerts.yml"
    shutil.copyfile(ALERT_RULES, rules)
    children = [("ingest-1", 4001), ("ingest-2", 4002), ("deliver-webhook", 4003), ("lag-exporter", 4004)]
    path = tmp_path / "prometheus.yml"
    path.write_text(prometheus_config(children, rules))
    doc = yaml.safe_load(path.read_text())
    assert doc["rule_files"] == [str(rules)]
    targets = {c["job_name"]: c["static_configs"][0]["targets"] for c in doc["scrape_configs"]}
    assert targets == {
        "herald-ingest": ["127.0.0.1:4001", "127.0.0.1:4002"],
        "herald-deliver-webhook": ["127.0.0.1:4003"],
        "herald-lag-exporter": ["127.0.0.1:4004"],
    }
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make tools` installs Debian's prometheus package"
    done = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
