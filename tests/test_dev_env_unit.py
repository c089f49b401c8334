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
