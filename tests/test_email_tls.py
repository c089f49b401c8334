"""The email provider's TLS and login paths against aiosmtpd on loopback (no broker needed):
STARTTLS and implicit TLS with certificate checks on (the test's own CA, trusted through
SSL_CERT_FILE), SMTP AUTH over TLS, and a relay that cannot STARTTLS refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import ipaddress
import socket
import ssl
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from channels.base import Endpoint
from channels.email import EmailProvider
from config.settings import Settings
from tests.smtp_peer import Handler

# The same server-side transports may also be collected in the middle of a test, whenever
# the collector happens to run (a CI run saw it): their warning is ignored here too.
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(autouse=True)
def collect_the_peers_transports() -> Iterator[None]:
    """aiosmtpd leaves the server side of a failed TLS handshake or login unclosed (its
    ``_handle_client``/``smtp_STARTTLS``, not herald's client): collect it here, quietly,
    rather than let its ResourceWarning surface in whichever later test runs the collector."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "herald test relay")])
    now = dt.datetime.now(dt.UTC)
    made = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(made.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return folder / "cert.pem", folder / "key.pem"


def login(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"herald", b"s3cret")
    return AuthResult(success=ok, handled=False)


def relay(cert: tuple[Path, Path], *, implicit: bool = False, starttls: bool = True) -> Controller:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(*cert)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kwargs: dict[str, Any] = {"authenticator": login, "auth_require_tls": True}
    if implicit:
        # aiosmtpd does not count a TLS-from-the-start session as TLS for AUTH; it is one.
        kwargs |= {"ssl_context": server_ctx, "auth_require_tls": False}
    elif starttls:
        kwargs |= {"tls_context": server_ctx, "require_starttls": True}
    c = Controller(Handler(), hostname="127.0.0.1", port=port, **kwargs)
    c.start()
    return c


@pytest.fixture
def trusted(cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
    yield


def send(controller: Controller, **smtp: Any) -> Any:
    settings = Settings(
        smtp={"host": "127.0.0.1", "port": controller.port, "from": "herald@example.com", "timeout_s": 5}
        | smtp
    )
    provider = EmailProvider(settings)
    delivery = {"delivery_id": str(uuid.uuid4()), "user_id": "u", "title": "TLS", "severity": "critical"}

    async def go() -> Any:
        try:
            return await provider.send(Endpoint(1, "u", "ok@example.org"), delivery)
        finally:
            await provider.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_tls_and_login(cert: tuple[Path, Path], trusted: None, implicit: bool) -> None:
    c = relay(cert, implicit=implicit)
    try:
        result = send(c, tls="implicit" if implicit else "starttls", username="herald", password="s3cret")
        assert result.outcome == "ok", result
        assert len(c.handler.received) == 1
        bad = send(c, tls="implicit" if implicit else "starttls", username="herald", password="wrong")
        assert (bad.outcome, "connecting to the relay" in (bad.error or "")) == ("transient", True)
    finally:
        c.stop()
        c.loop.close()


def test_an_untrusted_certificate_or_a_relay_without_starttls_is_refused(cert: tuple[Path, Path]) -> None:
    c = relay(cert)  # the test CA is not trusted here: the certificate check fails
    plain = relay(cert, starttls=False)
    try:
        untrusted = send(c, tls="starttls")
        assert untrusted.outcome == "transient" and "certificate" in (untrusted.error or "").lower()
        no_tls = send(plain, tls="starttls")
        assert no_tls.outcome == "transient" and "STARTTLS" in (no_tls.error or "")
        assert c.handler.received == [] and plain.handler.received == []
    finally:
        for ctl in (c, plain):
            ctl.stop()
            ctl.loop.close()
