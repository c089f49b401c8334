"""The hand-over from the producer's poll thread to a request's event loop (pure)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from core.errors import BrokerUnavailable
from producers.acks import hand_over


def test_an_ack_from_another_thread_resolves_the_future() -> None:
    async def wait() -> tuple[str, int, int]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[str, int, int]] = loop.create_future()
        threading.Thread(target=hand_over, args=(loop, fut, None, ("t", 1, 7))).start()
        return await asyncio.wait_for(fut, 5)

    assert asyncio.run(wait()) == ("t", 1, 7)


def test_a_failure_from_another_thread_raises_in_the_request() -> None:
    async def wait() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[str, int, int]] = loop.create_future()
        threading.Thread(target=hand_over, args=(loop, fut, BrokerUnavailable("gone"), None)).start()
        await asyncio.wait_for(fut, 5)

    with pytest.raises(BrokerUnavailable, match="gone"):
        asyncio.run(wait())


def test_an_ack_after_the_request_timed_out_is_dropped() -> None:
    async def wait() -> asyncio.Future[tuple[str, int, int]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[str, int, int]] = loop.create_future()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fut, 0.01)  # cancels fut
        hand_over(loop, fut, None, ("t", 0, 1))
        await asyncio.sleep(0.01)
        return fut

    assert asyncio.run(wait()).cancelled()


def test_an_ack_after_the_loop_closed_does_not_raise() -> None:
    loop = asyncio.new_event_loop()
    fut: asyncio.Future[tuple[str, int, int]] = loop.create_future()
    loop.close()
    hand_over(loop, fut, None, ("t", 0, 1))  # the final flush at shutdown: nobody waits any more
    assert not fut.done()
