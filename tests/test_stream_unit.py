"""Pure tests of the stream's parts: the hub's fan-out, SSE frames, positions, stream tokens."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
from pydantic import SecretStr, ValidationError

from api.auth import StreamTokens, TokenVerifier, Unauthorized
from api.stream import RESYNC, Hub, frame
from config.settings import ApiSettings
from storage.stream import valid_position

SECRET = "s" * 40


def test_a_slow_subscriber_is_dropped_and_never_holds_up_the_others() -> None:
    async def scenario() -> None:
        hub = Hub(queue_size=4)
        slow, fast, other = hub.subscribe("ann"), hub.subscribe("ann"), hub.subscribe("bob")
        got: list[str] = []

        async def reader() -> None:
            while True:
                got.append(await fast.queue.get())

        task = asyncio.create_task(reader())
        for i in range(50):  # the slow one never reads: its queue fills after 4
            hub.publish("ann", f"new{i}")
            await asyncio.sleep(0)
        assert slow.dropped.is_set() and slow.reason == "slow"
        assert not fast.dropped.is_set()
        assert got == [f"new{i}" for i in range(50)]
        assert other.queue.empty()  # another user's stream hears nothing of ann's
        hub.wake_all()
        assert other.queue.get_nowait() == RESYNC
        hub.unsubscribe(slow)
        assert len(hub) == 2
        hub.close()
        assert fast.dropped.is_set() and other.dropped.is_set()
        assert hub.subscribe("late").dropped.is_set()  # after close, a new stream ends at once
        task.cancel()

    asyncio.run(scenario())


def test_frames() -> None:
    assert frame("unread", '{"count":3}', "10:12:11") == b'event: unread\nid: 10:12:11\ndata: {"count":3}\n\n'
    assert frame("notification", "{}") == b"event: notification\ndata: {}\n\n"


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("759:759:", True),
        ("759:764:760,762", True),
        ("", False),
        ("0:1:", False),
        ("1:2:3:", False),
        ("1:2:3,", False),
        ("1:2:a", False),
        ("1:2:\n", False),
        ("1:" + "9" * 21 + ":", False),
        ("1:2:" + ",".join(["3"] * 5000), False),
    ],
)
def test_positions(text: str, ok: bool) -> None:
    assert valid_position(text) is ok


def test_stream_tokens() -> None:
    api = ApiSettings(jwt_secret=SecretStr(SECRET), audience="app", stream_token_ttl_s=30)
    tokens = StreamTokens(api)
    session_end = time.time() + 3600
    token, ttl = tokens.mint("ann", session_end)
    assert 29 <= ttl <= 30
    assert tokens.verify(token) == ("ann", float(int(session_end)))
    # Never longer than the session it came from.
    _, short = tokens.mint("ann", time.time() + 5)
    assert short <= 5
    # A stream token is not a bearer token, though both derive from the one secret.
    with pytest.raises(Unauthorized):
        TokenVerifier(api).user_id(f"Bearer {token}")
    # And a bearer token is not a stream token.
    bearer = jwt.encode({"sub": "ann", "aud": "app", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized):
        tokens.verify(bearer)
    # Another process with the same secret accepts it; one with another secret does not.
    assert StreamTokens(api).verify(token)[0] == "ann"
    other = StreamTokens(ApiSettings(jwt_secret=SecretStr("t" * 40)))
    with pytest.raises(Unauthorized):
        other.verify(token)
    # HERALD_API__STREAM_SECRET wins over the derived key.
    own = StreamTokens(ApiSettings(jwt_secret=SecretStr(SECRET), stream_secret=SecretStr("u" * 40)))
    with pytest.raises(Unauthorized):
        own.verify(token)
    for missing in (None, ""):
        with pytest.raises(Unauthorized) as err:
            tokens.verify(missing)
        assert err.value.reason == "missing"


@pytest.mark.parametrize("bad", ["https://app.example.com/", "*", "app.example.com", "https://*.example.com"])
def test_cors_origins_are_origins(bad: str) -> None:
    with pytest.raises(ValidationError):
        ApiSettings(cors_origins=[bad])
    assert ApiSettings(cors_origins=["https://app.example.com", "http://localhost:3000"]).cors_origins
