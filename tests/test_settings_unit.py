"""Settings: librdkafka passthrough, the TOML file, precedence and validation (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from config.settings import PolicySettings, Settings, load_settings

pytestmark = pytest.mark.usefixtures("no_herald_env")


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "herald.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_kafka_properties_pass_through_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_KAFKA_BOOTSTRAP", "broker-1:9093")
    monkeypatch.setenv("HERALD_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("HERALD_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("HERALD_KAFKA__SASL_USERNAME", "Bob")
    conf = Settings().kafka_client_config()
    assert conf["sasl.mechanism"] == "PLAIN"
    assert conf["security.protocol"] == "SASL_SSL"  # values keep their case and underscores
    assert conf["sasl.username"] == "Bob"
    assert conf["bootstrap.servers"] == "broker-1:9093"


def test_secrets_are_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_DATABASE_URL", "postgresql://herald:hunter2@db/herald")
    s = Settings()
    assert "hunter2" not in repr(s)
    assert s.database_url.get_secret_value() == "postgresql://herald:hunter2@db/herald"


def test_toml_file_sets_batch_size_and_rate_limits(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        """
batch_size = 123
topic_prefix = "acme"

[kafka]
"sasl.mechanism" = "SCRAM-SHA-512"

[policy]
digest_minutes = 10

[policy.rate_limits]
email = 2
push = 7
""",
    )
    s = load_settings(path)
    assert s.batch_size == 123
    assert s.topic_prefix == "acme"
    assert s.policy.digest_minutes == 10
    assert s.policy.rate_limit("email") == 2
    assert s.policy.rate_limit("push") == 7
    assert s.kafka_client_config()["sasl.mechanism"] == "SCRAM-SHA-512"


def test_partial_rate_limits_keep_the_other_defaults(tmp_path: Path) -> None:
    """BUG (config/settings.py, PolicySettings.rate_limits): a TOML or env value replaces the whole
    mapping, so setting only ``email`` drops push (20) and webhook (60), and ``rate_limit("push")``
    falls back to 1,000,000: push becomes unlimited without anyone asking for it."""
    s = load_settings(toml(tmp_path, "[policy.rate_limits]\nemail = 2\n"))
    assert s.policy.rate_limit("email") == 2
    assert s.policy.rate_limit("push") == 20, f"push limit silently became {s.policy.rate_limit('push')}"
    assert s.policy.rate_limit("webhook") == 60


def test_environment_wins_over_the_toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = toml(tmp_path, 'batch_size = 123\nlog_level = "DEBUG"\n[policy]\ndigest_minutes = 10\n')
    monkeypatch.setenv("HERALD_BATCH_SIZE", "77")
    monkeypatch.setenv("HERALD_POLICY__DIGEST_MINUTES", "3")
    s = load_settings(path)
    assert s.batch_size == 77
    assert s.policy.digest_minutes == 3
    assert s.log_level == "DEBUG"  # what the environment does not set still comes from the file


def test_keyword_arguments_win_over_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_BATCH_SIZE", "77")
    s = load_settings(toml(tmp_path, "batch_size = 123\n"), batch_size=5)
    assert s.batch_size == 5


def test_missing_toml_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "nope.toml")


def test_defaults() -> None:
    s = Settings()
    assert s.topic_prefix == "herald"
    assert (s.policy.in_app, s.policy.email, s.policy.push, s.policy.webhook) == (True, False, False, False)
    assert s.policy.digest_minutes == 5
    assert (s.policy.rate_limit("email"), s.policy.rate_limit("push")) == (5, 20)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HERALD_BATCH_SIZE", "0"),
        ("HERALD_BATCH_SIZE", "lots"),
        ("HERALD_TOPIC_PARTITIONS", "0"),
        ("HERALD_SESSION_TIMEOUT_MS", "10"),
        ("HERALD_MAX_EVENT_BYTES", "12"),
        ("HERALD_POLICY__DIGEST_MINUTES", "-1"),
        ("HERALD_POLICY__SUMMARY_CHARS", "1000"),
    ],
)
def test_invalid_environment_values_are_rejected(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_invalid_toml_values_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        load_settings(toml(tmp_path, "batch_size = -5\n"))


def test_invalid_redaction_pattern_is_rejected() -> None:
    with pytest.raises(ValidationError, match="not a valid regex"):
        PolicySettings(redactions=("(unclosed",))


def test_settings_are_frozen_but_model_copy_works() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.batch_size = 9  # type: ignore[misc]
    assert s.model_copy(update={"batch_size": 9}).batch_size == 9


def test_an_empty_variable_is_an_unset_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """As compose and Kubernetes pass "not configured" (`HERALD_APP_URL=`): the default holds."""
    for name in ("HERALD_APP_URL", "HERALD_RECEIVER__SOURCES", "HERALD_SMTP__PASSWORD", "HERALD_BATCH_SIZE"):
        monkeypatch.setenv(name, "")
    s = Settings()
    assert (s.app_url, s.receiver.sources, s.smtp.password, s.batch_size) == (None, {}, None, 2000)
