"""The email channel: one multipart message per delivery, over a pool of SMTP connections.

The message: ``Subject`` is the title; a text part and an HTML part from templates
(``string.Template``, built in or replaced by ``HERALD_SMTP__TEXT_TEMPLATE`` /
``__HTML_TEMPLATE``), every value HTML-escaped in the HTML part; a summary and a link to
``target_url`` (a relative one joined to ``HERALD_APP_URL``); a digest lists its items in
both parts. ``Message-ID`` is ``<delivery id@sender's domain>``: the same on every retry,
so a resend in the send-once window is recognisable. With ``HERALD_UNSUBSCRIBE_SECRET``
and ``HERALD_PUBLIC_URL`` set, RFC 8058 one-click unsubscribe headers point at the API's
``/v1/unsubscribe`` with a token over the user and the channel (``core/unsubscribe.py``).

Answers: an SMTP 4xx, a dropped connection and a timeout are transient; a 5xx (a refused
recipient among them) is permanent. Every address goes through one relay, so the circuit
breaker's key is the relay.
"""

from __future__ import annotations

import asyncio
import binascii
import html
import logging
import os
import ssl
import string
from dataclasses import dataclass
from email.header import Header
from email.utils import formataddr, formatdate, getaddresses
from pathlib import Path
from typing import Any

import aiosmtplib

from channels.base import Endpoint, SendResult
from channels.webhook import absolute_url
from config.settings import Settings
from core.errors import ConfigError
from core.unsubscribe import unsubscribe_url

log = logging.getLogger(__name__)

TEXT_TEMPLATE = """\
$title

$summary

Open: $url
$items
--
You get this email because email notifications are on for your account.
Unsubscribe: $unsubscribe_url
"""

HTML_TEMPLATE = """\
<!doctype html>
<html><body style="font-family: sans-serif">
<h2>$title</h2>
<p>$summary</p>
<p><a href="$url">Open</a></p>
$items
<hr><p style="font-size: small">You get this email because email notifications are on for
your account. <a href="$unsubscribe_url">Unsubscribe</a></p>
</body></html>
"""

FIELDS = ("title", "summary", "url", "items", "unsubscribe_url", "severity")


@dataclass(frozen=True)
class Templates:
    text: string.Template
    html: string.Template

    @classmethod
    def load(cls, text_path: Path | None, html_path: Path | None) -> Templates:
        """The built-in templates, or the files named in settings (checked now: a typo in a
        placeholder fails at start-up, not on the first email)."""
        made = cls(_template(text_path, TEXT_TEMPLATE), _template(html_path, HTML_TEMPLATE))
        probe = dict.fromkeys(FIELDS, "x")
        for name, t in (("text_template", made.text), ("html_template", made.html)):
            try:
                t.substitute(probe)
            except (KeyError, ValueError) as exc:
                raise ConfigError(
                    f"HERALD_SMTP__{name.upper()}: unknown or malformed placeholder {exc} "
                    f"(use {', '.join('$' + f for f in FIELDS)})"
                ) from None
        return made


def _template(path: Path | None, default: str) -> string.Template:
    if path is None:
        return string.Template(default)
    try:
        return string.Template(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read email template {path}: {exc.strerror or exc}") from None


def items_text(items: list[dict[str, Any]], more: int, app_url: str | None) -> str:
    lines = [f"- {i.get('title') or ''}" + _tail(absolute_url(i.get("target_url"), app_url)) for i in items]
    if more:
        lines.append(f"and {more} more")
    return ("\n" + "\n".join(lines) + "\n") if lines else ""


def _tail(url: str | None) -> str:
    return f": {url}" if url else ""


def items_html(items: list[dict[str, Any]], more: int, app_url: str | None) -> str:
    if not items:
        return ""
    esc = html.escape
    rows = []
    for i in items:
        title = esc(str(i.get("title") or ""))
        url = absolute_url(i.get("target_url"), app_url)
        rows.append(f'<li><a href="{esc(url)}">{title}</a></li>' if url else f"<li>{title}</li>")
    if more:
        rows.append(f"<li>and {more} more</li>")
    return "<ul>" + "".join(rows) + "</ul>"


def render(
    templates: Templates, delivery: dict[str, Any], app_url: str | None, unsubscribe: str | None
) -> tuple[str, str]:
    """The text and the HTML part of ``delivery``'s email (a digest lists its items)."""
    items = delivery.get("items") if delivery.get("type") == "digest" else None
    listed = items if isinstance(items, list) else []
    more = int(delivery.get("more") or 0) if listed else 0
    plain = {
        "title": str(delivery.get("title") or ""),
        "summary": str(delivery.get("summary") or ""),
        "url": absolute_url(delivery.get("target_url"), app_url) or app_url or "",
        "unsubscribe_url": unsubscribe or "",
        "severity": str(delivery.get("severity") or ""),
    }
    text = templates.text.substitute(plain, items=items_text(listed, more, app_url))
    escaped = {k: html.escape(v) for k, v in plain.items()}
    markup = templates.html.substitute(escaped, items=items_html(listed, more, app_url))
    return text, markup


def encoded_word(text: str) -> str:
    """A header value: as it is when printable ASCII, else RFC 2047 encoded words (UTF-8)."""
    if text.isascii() and text.isprintable():
        return text
    return Header(text, "utf-8").encode()


def address_header(address: str) -> str:
    if not address or "@" not in address or any(c in address for c in '\r\n<>,;"') or " " in address:
        raise ValueError(f"not a plain email address: {address[:100]!r}")
    return address


def _part(subtype: str, text: str) -> bytes:
    return (
        f"Content-Type: text/{subtype}; charset=utf-8\n".encode()
        + b"Content-Transfer-Encoding: quoted-printable\n\n"
        + binascii.b2a_qp(text.encode("utf-8"))
    )


def compose(headers: list[tuple[str, str]], text: str, markup: str) -> bytes:
    """A multipart/alternative message (text, then HTML; quoted-printable UTF-8), as bytes.

    Written out directly rather than through ``email.message``: the standard library's
    generator costs over a millisecond per message, most of the email channel's budget.
    Header values are single lines (checked by the callers) of at most 998 characters, so
    a long ``List-Unsubscribe`` URL stays one usable header; line endings become CRLF on the
    wire (aiosmtplib normalises them, and dot-stuffs).
    """
    boundary = "=_herald_" + os.urandom(12).hex()
    head = "".join(f"{name}: {value}\n" for name, value in headers)
    head += f'MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary="{boundary}"\n\n'
    sep = f"\n--{boundary}\n".encode()
    return (
        head.encode()
        + sep[1:]
        + _part("plain", text)
        + sep
        + _part("html", markup)
        + f"\n--{boundary}--\n".encode()
    )


class EmailProvider:
    channel = "email"

    def __init__(self, settings: Settings) -> None:
        smtp = settings.smtp
        if not smtp.host:
            raise ConfigError("the email channel needs an SMTP relay: set HERALD_SMTP__HOST (and __FROM)")
        if not smtp.from_:
            raise ConfigError("the email channel needs a sender: set HERALD_SMTP__FROM")
        parsed = getaddresses([smtp.from_])
        if not parsed or "@" not in parsed[0][1]:
            raise ConfigError(f"HERALD_SMTP__FROM: not an email address: {smtp.from_!r}")
        self._name, self._sender = parsed[0]
        self._domain = self._sender.rsplit("@", 1)[1]
        self._from_header = formataddr((self._name, self._sender)) if self._name else self._sender
        self._smtp = smtp
        self._host = smtp.host
        self._templates = Templates.load(smtp.text_template, smtp.html_template)
        self._app_url = settings.app_url
        secret = settings.unsubscribe_secret
        self._unsubscribe = (
            (settings.public_url, secret.get_secret_value())
            if secret is not None and settings.public_url
            else None
        )
        if self._unsubscribe is None:
            log.warning(
                "email: HERALD_UNSUBSCRIBE_SECRET or HERALD_PUBLIC_URL is unset: "
                "emails go out without one-click unsubscribe headers",
                extra={"channel": "email"},
            )
        self._pool: asyncio.Queue[aiosmtplib.SMTP | None] | None = None

    def target(self, endpoint: Endpoint) -> str:
        return f"smtp:{self._host}:{self._smtp.port}"

    def message(self, endpoint: Endpoint, delivery: dict[str, Any]) -> bytes:
        """The whole message for ``delivery`` to ``endpoint``, as sent (public for tests and the bench)."""
        unsubscribe = None
        if self._unsubscribe is not None:
            public_url, secret = self._unsubscribe
            unsubscribe = unsubscribe_url(public_url, secret, str(delivery["user_id"]), "email")
        text, markup = render(self._templates, delivery, self._app_url, unsubscribe)
        headers = [
            ("From", self._from_header),
            ("To", address_header(endpoint.address)),
            ("Subject", encoded_word(" ".join(str(delivery.get("title") or "").split()))),
            ("Date", formatdate(usegmt=True)),
            ("Message-ID", self.message_id(delivery)),
            ("Auto-Submitted", "auto-generated"),
        ]
        if unsubscribe is not None:
            headers.append(("List-Unsubscribe", f"<{unsubscribe}>"))
            headers.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
        return compose(headers, text, markup)

    def message_id(self, delivery: dict[str, Any]) -> str:
        return f"<{delivery['delivery_id']}@{self._domain}>"

    async def send(self, endpoint: Endpoint, delivery: dict[str, Any]) -> SendResult:
        try:
            raw = self.message(endpoint, delivery)
        except ValueError as exc:
            # A malformed address in the endpoint (a line break, no @).
            return SendResult("permanent", error=f"cannot address this email: {exc}"[:300])
        message_id = self.message_id(delivery)
        pool = self._connections()
        client = await pool.get()
        # A connection goes back to the pool only in a known state: after a reply that ends the
        # transaction (aiosmtplib sends RSET after a refusal). A drop, a timeout, a 421, or a
        # send cancelled halfway (a rebalance) closes it instead.
        keep = False
        try:
            if client is None or not client.is_connected:
                client = None
                try:
                    client = await self._connect()
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    # Whatever the relay says before it takes mail (a 554 greeting, a refused
                    # login) is about the relay, not this message: transient, and the breaker's.
                    return SendResult("transient", error=f"connecting to the relay: {exc}"[:300])
            await client.sendmail(self._sender, [endpoint.address], raw)
            keep = True
            return SendResult("ok", 250, provider_message_id=message_id)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            keep = True
            code = exc.recipients[0].code if exc.recipients else 550
            return _reply(code, f"recipient refused: {code}")
        except aiosmtplib.SMTPResponseException as exc:
            keep = exc.code > 0 and exc.code != 421  # 421: the server is closing this connection
            return _reply(exc.code, f"SMTP {exc.code}: {exc.message}")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return SendResult("transient", error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            if not keep and client is not None:
                client.close()
                client = None
            pool.put_nowait(client)

    def _connections(self) -> asyncio.Queue[aiosmtplib.SMTP | None]:
        # Made on first use, on the loop that sends: slots, each connected when first taken.
        if self._pool is None:
            self._pool = asyncio.Queue()
            for _ in range(self._smtp.pool_size):
                self._pool.put_nowait(None)
        return self._pool

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self._smtp
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=s.port,
            timeout=s.timeout_s,
            use_tls=s.tls == "implicit",
            start_tls=True if s.tls == "starttls" else False,
            tls_context=ssl.create_default_context() if s.tls != "none" else None,
            username=s.username,
            password=s.password.get_secret_value() if s.password is not None else None,
        )
        try:
            await client.connect()
        except BaseException:
            client.close()  # a refused login or TLS leaves the socket open otherwise
            raise
        return client

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        while pool is not None and not pool.empty():
            client = pool.get_nowait()
            if client is not None and client.is_connected:
                try:
                    await asyncio.wait_for(client.quit(), timeout=2)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()


def _reply(code: int, error: str) -> SendResult:
    """4xx: try again later; 5xx: refused for good; anything else (no reply): transient."""
    if 500 <= code < 600:
        return SendResult("permanent", code, error=error[:300])
    return SendResult("transient", code if code > 0 else None, error=error[:300])
