"""A real SMTP server on loopback (aiosmtpd) that keeps every message it accepted, parsed.

Recipients pick a behaviour, so one server plays every kind of mailbox: ``ok@…`` accepts;
``refuse@…`` is refused at RCPT (550); ``busy<n>@…`` answers 421 at DATA for the first n
tries of each Message-ID, then accepts; ``slow<ms>@…`` accepts after that long. ``down()``
stops the server (connections are refused) and ``up()`` starts it again on the same port.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    sender: str
    recipients: list[str]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        msg = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg

    def part(self, subtype: str) -> str:
        body = self.message.get_body(preferencelist=(subtype,))
        assert body is not None, f"no text/{subtype} part"
        return str(body.get_content())  # type: ignore[attr-defined]


class Handler:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.tries: Counter[str] = Counter()  # Message-ID -> DATA commands seen

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.startswith("refuse@"):
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        raw = envelope.original_content or b""
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        mid = str(msg.get("Message-ID", ""))
        with self.lock:
            self.tries[mid] += 1
            tries = self.tries[mid]
        for rcpt in envelope.rcpt_tos:
            if rcpt.startswith("slow"):
                await asyncio.sleep(int(rcpt[4 : rcpt.index("@")]) / 1000)
            if rcpt.startswith("busy"):
                n = int(rcpt[4 : rcpt.index("@")] or 1)
                if tries <= n:
                    return "421 4.3.2 try again later"
        with self.lock:
            self.received.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos), raw))
        return "250 2.0.0 queued"


class SmtpPeer:
    def __init__(self) -> None:
        self.handler = Handler()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._controller: Controller | None = None
        self.up()

    def up(self) -> None:
        c = Controller(self.handler, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=True)
        c.start()
        self._controller = c

    def down(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller.loop.close()
            self._controller = None

    def close(self) -> None:
        self.down()

    @property
    def received(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.received)

    def ids(self) -> Counter[str]:
        """Accepted messages per Message-ID."""
        return Counter(str(r.message["Message-ID"]) for r in self.received)

    def smtp_settings(self, **extra: Any) -> dict[str, Any]:
        base = {"host": "127.0.0.1", "port": self.port, "tls": "none", "from": "herald <herald@example.com>"}
        return base | extra
