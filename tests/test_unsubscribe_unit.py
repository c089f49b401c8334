"""One-click unsubscribe tokens (pure): made and checked by one module, forgeries refused."""

from __future__ import annotations

import pytest

from core.unsubscribe import InvalidToken, make_token, read_token, unsubscribe_url

SECRET = "unit-test-unsubscribe-secret-0123"


@pytest.mark.parametrize("user", ["alice", "u.with.dots", "ünïcode-用户", "x" * 400])
@pytest.mark.parametrize("channel", ["email", "push", "webhook"])
def test_roundtrip(user: str, channel: str) -> None:
    assert read_token(SECRET, make_token(SECRET, user, channel)) == (user, channel)


def test_another_secret_is_refused() -> None:
    with pytest.raises(InvalidToken, match="signature"):
        read_token(SECRET, make_token("another-secret-0123456789", "alice", "email"))


def test_changing_the_channel_or_user_breaks_the_signature() -> None:
    prefix, user, _, mac = make_token(SECRET, "alice", "email").split(".")
    with pytest.raises(InvalidToken):
        read_token(SECRET, ".".join([prefix, user, "push", mac]))
    bob = make_token(SECRET, "bob", "email").split(".")[1]
    with pytest.raises(InvalidToken):
        read_token(SECRET, ".".join([prefix, bob, "email", mac]))


@pytest.mark.parametrize(
    "bad",
    ["", "v1", "v1.a.email", "v2.YWxpY2U.email.AAAA", "v1.YWxpY2U.fax.AAAA", "v1.!!.email.AAAA", "x" * 2000],
)
def test_malformed_tokens_are_refused(bad: str) -> None:
    with pytest.raises(InvalidToken, match="malformed"):
        read_token(SECRET, bad)


def test_every_single_character_change_is_refused() -> None:
    token = make_token(SECRET, "alice", "email")
    for i, ch in enumerate(token):
        for other in ("A", "-", "_", "z"):
            if other == ch:
                continue
            altered = token[:i] + other + token[i + 1 :]
            with pytest.raises(InvalidToken):
                read_token(SECRET, altered)


def test_unknown_channels_and_bad_users_are_not_minted() -> None:
    with pytest.raises(ValueError, match="channel"):
        make_token(SECRET, "alice", "fax")
    with pytest.raises(ValueError, match="user_id"):
        make_token(SECRET, "", "email")


def test_url_is_the_public_base_plus_the_route() -> None:
    url = unsubscribe_url("https://herald.example.com/", SECRET, "alice", "email")
    assert url.startswith("https://herald.example.com/v1/unsubscribe?token=v1.")
