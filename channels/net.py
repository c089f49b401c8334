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
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

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
