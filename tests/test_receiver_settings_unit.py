"""The receiver's settings: every way to write sources, and one clear error for each mistake (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from config.settings import ReceiverSettings, Settings, load_settings
from herald.cli import one_line

pytestmark = pytest.mark.usefixtures("no_herald_env")

SW = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_defaults() -> None:
    r = Settings().receiver
    assert (r.host, r.port, r.sources, r.max_body_bytes) == ("127.0.0.1", 8700, {}, 1024 * 1024)
    assert r.ack_timeout_s > 0


def test_sources_as_one_json_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "HERALD_RECEIVER__SOURCES",
        f'{{"stripe": {{"scheme": "stripe", "secrets": ["whsec_a", "whsec_b"]}}, '
        f'"gh": {{"scheme": "github", "secrets": ["s"]}}, '
        f'"sw": {{"scheme": "standard-webhooks", "secrets": ["{SW}"]}}}}',
    )
    monkeypatch.setenv("HERALD_RECEIVER__PORT", "0")
    r = Settings().receiver
    assert r.port == 0
    assert {k: v.scheme for k, v in r.sources.items()} == {
        "stripe": "stripe",
        "gh": "github",
        "sw": "standard-webhooks",
    }
    assert [s.get_secret_value() for s in r.sources["stripe"].secrets] == ["whsec_a", "whsec_b"]


def test_one_source_per_variable_with_comma_separated_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The form ``herald dev`` writes to dev.env: a shell can source it without quotes."""
    monkeypatch.setenv("HERALD_RECEIVER__SOURCES__DEV__SCHEME", "standard-webhooks")
    monkeypatch.setenv("HERALD_RECEIVER__SOURCES__DEV__SECRETS", f"{SW},{SW.removeprefix('whsec_')}")
    dev = Settings().receiver.sources["dev"]
    assert len(dev.secrets) == 2


def test_sources_as_a_toml_table(tmp_path: Path) -> None:
    path = tmp_path / "herald.toml"
    path.write_text(
        """
[receiver]
port = 8800
max_body_bytes = 2048

[receiver.sources.acme]
scheme = "hmac-header"
secrets = ["k1", "k2"]
header = "X-Acme-Signature"
algorithm = "sha512"
encoding = "base64"
id_header = "X-Acme-Event"

[receiver.sources.local]
scheme = "none"
allow_unsigned = true
""",
        encoding="utf-8",
    )
    r = load_settings(path).receiver
    assert r.port == 8800 and r.max_body_bytes == 2048
    assert r.sources["acme"].header == "X-Acme-Signature" and r.sources["local"].scheme == "none"


@pytest.mark.parametrize(
    "sources, message",
    [
        ({"a": {"scheme": "hmac", "secrets": ["x"]}}, "unknown scheme 'hmac': use one of standard-webhooks"),
        ({"a": {"scheme": "github"}}, "scheme 'github' needs at least one non-empty secret"),
        ({"a": {"scheme": "stripe", "secrets": [""]}}, "needs at least one non-empty secret"),
        ({"a": {"scheme": "none"}}, 'set "allow_unsigned": true'),
        ({"a": {"scheme": "hmac-header", "secrets": ["x"]}}, 'needs "header"'),
        (
            {"a": {"scheme": "hmac-header", "secrets": ["x"], "header": "X", "algorithm": "md5"}},
            "unknown algorithm",
        ),
        ({"a": {"scheme": "standard-webhooks", "secrets": ["whsec_!!"]}}, "is base64"),
        ({"a/b": {"scheme": "github", "secrets": ["x"]}}, "URL path segment"),
        ({"a": {"scheme": "github", "secrets": ["x"], "sekrets": ["y"]}}, "sekrets"),
    ],
)
def test_each_mistake_is_one_clear_line(sources: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        ReceiverSettings(sources=sources)
    line = one_line(info.value)
    assert message in line
    assert "\n" not in line


def test_secrets_never_print() -> None:
    r = ReceiverSettings(sources={"a": {"scheme": "github", "secrets": ["very-secret-value"]}})
    assert "very-secret-value" not in repr(r) and "very-secret-value" not in str(r.model_dump())


def test_the_example_settings_file_loads() -> None:
    root = Path(__file__).resolve().parents[1]
    r = load_settings(root / "herald.example.toml").receiver
    assert {k: v.scheme for k, v in r.sources.items()} == {
        "stripe": "stripe",
        "github": "github",
        "billing": "standard-webhooks",
    }
