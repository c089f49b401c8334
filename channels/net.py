"""Outbound connections that refuse private targets (SSRF), checked where it counts.

A webhook URL is typed by a user; without a guard, herald would POST to
``http://169.254.169.254/`` or to an admin port on its own host. The name alone proves
nothing (``rebind.example`` can resolve to 127.0.0.1, and to something else a second
later), so the check sits in the resolver the connection pool connects with: every
address a name resolves to is checked, and the socket connects only to checked addresses.
aiohttp skips the resolver for an IP literal, so ``guard_url`` checks those before the
request. TLS still uses the original host name (SNI and certificate checks are unchanged).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from channels.base import SendResult
from core import __version__

ALLOW_HINT = (
    "HERALD_WEBHOOK__ALLOW_PRIVATE_TARGETS=true (webhooks) or "
    "HERALD_PUSH__ALLOW_PRIVATE_TARGETS=true (push) allows it"
)


class TargetRefused(Exception):
    """The target resolves to an address herald must not connect to."""


def refused_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public unicast address, or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private or ip.is_unspecified or ip.is_reserved or not ip.is_global:
        return "private"
    return None


def _check(host: str, address: str) -> None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    reason = refused_reason(ip)
    if reason is not None:
        # One bad address refuses the name: a round-robin of public and private is a trap.
        raise TargetRefused(f"{host} resolves to a {reason} address ({ip}); {ALLOW_HINT}")


class GuardedResolver(AbstractResolver):
    """The default resolver, with every address checked before the pool may connect to it."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        for info in found:
            _check(host, info["host"])
        return found

    async def close(self) -> None:
        await self._inner.close()


def guard_url(url: str, allow_private: bool) -> URL:
    """The parsed URL; raises TargetRefused for a private IP literal, ValueError for a bad URL."""
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"not an http(s) URL: {url[:100]}")
    if not allow_private:
        try:
            ipaddress.ip_address(parsed.host.split("%", 1)[0])
        except ValueError:
            return parsed  # a name: the resolver checks what it resolves to
        _check(parsed.host, parsed.host)
    return parsed


def guarded_session(
    allow_private: bool, *, connections: int, timeout_s: float, **kwargs: Any
) -> aiohttp.ClientSession:
    """A client session whose pool connects only to checked addresses (unless ``allow_private``),
    keeps up to ``connections`` connections alive, and never reads a proxy from the environment."""
    connector = aiohttp.TCPConnector(
        limit=connections,
        limit_per_host=0,
        resolver=None if allow_private else GuardedResolver(),
        ttl_dns_cache=10,
        keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        trust_env=False,
        auto_decompress=False,
        **kwargs,
    )


def refusal(exc: BaseException) -> TargetRefused | None:
    """The guard's refusal, when the pool wrapped it in a connection error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TargetRefused):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class GuardedPoster:
    """The HTTP side of a provider (webhooks, Web Push): one guarded, kept-alive pool, made
    on first use on the loop that sends (the pool belongs to that loop), and one POST whose
    answer ``classify`` reads; refusals, bad URLs, timeouts and dropped connections become
    the same outcomes for every HTTP channel."""

    def __init__(self, allow_private: bool, *, connections: int, timeout_s: float) -> None:
        self._allow_private = allow_private
        self._connections = connections  # one per send in flight: no handshake per delivery
        self._timeout = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = guarded_session(
                self._allow_private,
                connections=self._connections,
                timeout_s=self._timeout,
                headers={"user-agent": f"herald/{__version__}"},
            )
        return self._session

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        classify: Callable[[int, Mapping[str, str]], SendResult],
        *,
        https_only: bool = False,
    ) -> SendResult:
        """POST ``body`` to ``url`` (never following a redirect) and classify the answer;
        ``https_only``: plain http only where private targets are allowed."""
        try:
            parsed = guard_url(url, self._allow_private)
            if https_only and parsed.scheme != "https" and not self._allow_private:
                raise ValueError("the endpoint must be https")
            post = self._http().post(parsed, data=body, headers=dict(headers), allow_redirects=False)
            async with post as response:
                await response.read()
                return classify(response.status, response.headers)
        except TargetRefused as exc:
            return SendResult("permanent", error=str(exc))
        except (ValueError, aiohttp.InvalidURL) as exc:
            return SendResult("permanent", error=f"not a usable URL: {exc}"[:300])
        except TimeoutError:
            return SendResult("transient", error=f"timed out after {self._timeout:g}s")
        except aiohttp.ClientError as exc:
            refused = refusal(exc)
            if refused is not None:
                return SendResult("permanent", error=str(refused))
            return SendResult("transient", error=f"{type(exc).__name__}: {exc}"[:300])

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
