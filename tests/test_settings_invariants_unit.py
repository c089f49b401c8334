"""The librdkafka passthrough cannot override the properties herald's guarantees rest on (pure)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from config.settings import INVARIANT_KAFKA_PROPERTIES, Settings, load_settings
from tests.helpers import ROOT

INVARIANTS = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "acks",
    "enable.idempotence",
    "group.id",
    "bootstrap.servers",
    "isolation.level",
    "enable.partition.eof",
]


pytestmark = pytest.mark.usefixtures("no_herald_env")


def env_name(prop: str) -> str:
    return "HERALD_KAFKA__" + prop.upper().replace(".", "_")


@pytest.mark.parametrize("prop", INVARIANTS)
def test_invariant_property_from_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch, prop: str
) -> None:
    monkeypatch.setenv(env_name(prop), "x")
    with pytest.raises(ValidationError) as info:
        Settings()
    message = str(info.value)
    assert f"librdkafka property {prop} is herald's own" in message
    assert INVARIANT_KAFKA_PROPERTIES[prop] in message  # and why


def test_invariant_property_from_the_toml_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "herald.toml"
    path.write_text('[kafka]\n"enable.auto.commit" = "true"\n', encoding="utf-8")
    with pytest.raises(ValidationError, match="enable.auto.commit is herald's own"):
        load_settings(path)


def test_bootstrap_error_names_the_setting_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_KAFKA__BOOTSTRAP_SERVERS", "b:9092")
    with pytest.raises(ValidationError, match="set HERALD_KAFKA_BOOTSTRAP instead"):
        Settings()


def test_other_properties_still_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("HERALD_KAFKA__FETCH_MAX_BYTES", "1048576")
    conf = Settings().kafka_client_config()
    assert conf["sasl.mechanism"] == "PLAIN"
    assert conf["fetch.max.bytes"] == "1048576"


def test_cli_says_it_in_one_line_without_the_secrets() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update({"HERALD_KAFKA__ACKS": "1", "HERALD_KAFKA__SASL_PASSWORD": "hunter2"})
    proc = subprocess.run(
        [sys.executable, "-m", "herald.cli", "ingest"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("herald: invalid settings: kafka: librdkafka property acks is herald's own")
    assert "hunter2" not in proc.stderr
