"""The one small protocol every provider (webhook, SMTP, Web Push) speaks.

A provider sends one delivery to one endpoint and says how it went. It never raises for
a failed send: it classifies the failure, because only the provider knows what its
protocol's answers mean (a 410 from a webhook, a 550 from an SMTP server). The channel
consumer (``consumers/deliver.py``) decides what happens next: retry tier, dead letter,
or done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

# ok: accepted. transient: may pass (timeout, 5xx, 429). permanent: will not pass as it
# is (other 4xx, a refused target). gone: the endpoint no longer exists (410): disable it.
Outcome = Literal["ok", "transient", "permanent", "gone"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one user's deliveries on a channel go (a row of ``channel_endpoints``)."""

    id: int
    user_id: str
    address: str  # webhook URL, email address, or push subscription JSON
    secret: str | None = None  # the webhook's signing secret (whsec_...)


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    status_code: int | None = None
    # Short, payload-free: what an operator reads in last_error and the dead-letter headers.
    error: str | None = None
    provider_message_id: str | None = None
    # A transient answer that said when to come back (HTTP Retry-After), in seconds.
    retry_after_s: float | None = None


class Provider(Protocol):
    """One channel's sender. ``send`` runs on the deliverer's event loop."""

    channel: str

    def target(self, endpoint: Endpoint) -> str:
        """The host a send to ``endpoint`` goes to: the circuit breaker's key (a URL's
        host and port; an SMTP relay's name for every address)."""

    async def send(self, endpoint: Endpoint, delivery: dict[str, Any]) -> SendResult:
        """Send ``delivery`` (the delivery record: only what may leave the system) to ``endpoint``."""

    async def aclose(self) -> None:
        """Release connections; called once, on the loop that sent."""
