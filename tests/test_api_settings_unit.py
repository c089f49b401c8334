"""The API's settings from the environment, and what they refuse (pure)."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from config.settings import Settings

pytestmark = pytest.mark.usefixtures("no_herald_env")


def test_api_settings_and_mandatory_categories_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_API__HOST", "0.0.0.0")
    monkeypatch.setenv("HERALD_API__PORT", "9000")
    monkeypatch.setenv("HERALD_API__JWT_SECRET", "s" * 40)
    monkeypatch.setenv("HERALD_API__AUDIENCE", "my-app")
    monkeypatch.setenv("HERALD_API__ISSUER", "https://idp.example.com/")
    monkeypatch.setenv("HERALD_POLICY__MANDATORY_CATEGORIES", '["security", "legal"]')
    monkeypatch.setenv("HERALD_UNSUBSCRIBE_SECRET", "u" * 32)
    monkeypatch.setenv("HERALD_PUBLIC_URL", "https://herald.example.com/")
    s = Settings()
    assert (s.api.host, s.api.port, s.api.audience, s.api.issuer) == (
        "0.0.0.0",
        9000,
        "my-app",
        "https://idp.example.com/",
    )
    assert s.api.jwt_secret is not None and s.api.jwt_secret.get_secret_value() == "s" * 40
    assert s.policy.mandatory_categories == frozenset({"security", "legal"})
    assert s.public_url == "https://herald.example.com"
    assert "s" * 40 not in repr(s) and "u" * 32 not in repr(s)


def test_defaults() -> None:
    s = Settings()
    assert (s.api.host, s.api.port, s.api.jwt_secret, s.api.jwt_public_key) == ("127.0.0.1", 8600, None, None)
    assert (s.api.default_page_size, s.api.max_page_size) == (30, 100)
    assert s.unsubscribe_secret is None and s.policy.mandatory_categories == frozenset()


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("HERALD_API__JWT_SECRET", "short", "32 bytes"),
        ("HERALD_API__JWT_PUBLIC_KEY", "not a pem", "PEM"),
        ("HERALD_UNSUBSCRIBE_SECRET", "short", "16 characters"),
        ("HERALD_PUBLIC_URL", "herald.example.com", "http(s) URL"),
        ("HERALD_API__MAX_PAGE_SIZE", "0", "greater than or equal to 1"),
    ],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=re.escape(says)):
        Settings()
