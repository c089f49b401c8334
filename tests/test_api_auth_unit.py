"""TokenVerifier (pure): which tokens pass, the bounded cache, and exp honoured on a cache hit."""

from __future__ import annotations

import time

import jwt
import pytest

from api.auth import TokenVerifier, Unauthorized, mint
from config.settings import ApiSettings
from core.errors import ConfigError

SECRET = "unit-" + "k" * 59
API = ApiSettings(jwt_secret=SECRET, audience="aud-1", leeway_s=0, token_cache_size=3)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_a_minted_token_names_its_user() -> None:
    v = TokenVerifier(API)
    assert v.user_id(bearer(mint(API, "alice"))) == "alice"
    assert v.user_id(f"bearer  {mint(API, 'bob')}") == "bob"  # scheme is case-insensitive


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Basic dXNlcjpwYXNz", "malformed"),
        ("Bearer ", "malformed"),
        ("Bearer " + "a" * 9000, "malformed"),
        ("Bearer abc", "malformed"),
    ],
)
def test_malformed_headers(header: str | None, reason: str) -> None:
    with pytest.raises(Unauthorized) as err:
        TokenVerifier(API).user_id(header)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"sub": "a", "aud": "aud-2", "exp": 2**40}, "audience"),
        ({"sub": "a", "exp": 2**40}, "claims"),
        ({"aud": "aud-1", "exp": 2**40}, "claims"),
        ({"sub": "a", "aud": "aud-1"}, "claims"),
        ({"sub": "a", "aud": "aud-1", "exp": 1}, "expired"),
        ({"sub": "", "aud": "aud-1", "exp": 2**40}, "claims"),
        ({"sub": "a", "aud": "aud-1", "exp": 2**40, "nbf": 2**40}, "claims"),
    ],
)
def test_claims_are_checked(claims: dict[str, object], reason: str) -> None:
    with pytest.raises(Unauthorized) as err:
        TokenVerifier(API).user_id(bearer(jwt.encode(claims, SECRET, algorithm="HS256")))
    assert err.value.reason == reason


def test_algorithms_other_than_the_configured_ones_are_refused() -> None:
    claims = {"sub": "a", "aud": "aud-1", "exp": 2**40}
    for token in (jwt.encode(claims, SECRET, algorithm="HS512"), jwt.encode(claims, None, algorithm="none")):
        with pytest.raises(Unauthorized) as err:
            TokenVerifier(API).user_id(bearer(token))
        assert err.value.reason == "algorithm"


def test_the_cache_is_bounded_and_still_honours_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    v = TokenVerifier(API)
    now = time.time()
    tokens = [
        jwt.encode({"sub": f"u{i}", "aud": "aud-1", "exp": int(now) + 10}, SECRET, algorithm="HS256")
        for i in range(5)
    ]
    for t in tokens:
        v.user_id(bearer(t))
    assert len(v._cache) == 3 and list(v._cache) == tokens[2:]
    monkeypatch.setattr(time, "time", lambda: now + 11)
    with pytest.raises(Unauthorized) as err:
        v.user_id(bearer(tokens[4]))  # a cache hit, past exp
    assert err.value.reason == "expired"
    assert tokens[4] not in v._cache


def test_no_key_is_a_config_error_and_mint_needs_the_secret() -> None:
    with pytest.raises(ConfigError, match="HERALD_API__JWT_SECRET"):
        TokenVerifier(ApiSettings())
    with pytest.raises(ConfigError, match="HERALD_API__JWT_SECRET"):
        mint(ApiSettings(), "alice")
