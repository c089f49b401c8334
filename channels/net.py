"""Outbound connections that refuse private targets (SSRF), checked where it counts.

A webhook URL is typed by a user; without a guard, herald would POST to
``http://169.254.169.254/`` or to an admin port on its own host. The name alone proves
nothing (``rebind.example`` can resolve to 127.0.0.1, and to something else a second
later), so the check runs inside the connection: the host is resolved once, every
address is checked, and the socket connects to a checked address. httpcore then does
TLS with the original host name (SNI and certificate checks are unchanged).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import anyio
import httpcore
import httpx


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


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, with the address check between resolving and connecting."""

    def __init__(self, allow_private: bool) -> None:
        self._allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self._allow_private:
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        with anyio.fail_after(timeout):
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        for ip in addresses:
            reason = refused_reason(ip)
            if reason is not None:
                # One bad address refuses the name: a round-robin of public and private is a trap.
                raise TargetRefused(
                    f"{host} resolves to a {reason} address ({ip}); "
                    "set HERALD_WEBHOOK__ALLOW_PRIVATE_TARGETS=true to allow it"
                )
        last: Exception | None = None
        for ip in addresses:
            try:
                return await self._inner.connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise last or httpcore.ConnectError(f"{host} did not resolve")

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise TargetRefused("unix sockets are not a delivery target")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def guarded_transport(allow_private: bool, *, max_connections: int = 100) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections go through ``GuardedBackend``.

    httpx builds its httpcore pool inside ``AsyncHTTPTransport``; the pool is replaced by one
    with the guarded backend and the same limits (httpx has no argument for a backend).
    """
    transport = httpx.AsyncHTTPTransport(retries=0, trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(  # noqa: SLF001 (see the docstring)
        ssl_context=httpx.create_ssl_context(),
        max_connections=max_connections,
        max_keepalive_connections=20,
        keepalive_expiry=30.0,
        http1=True,
        http2=False,
        network_backend=GuardedBackend(allow_private),
    )
    return transport
