"""The kernel: what every other layer may import, and what imports only ``config``.

- ``errors``: the one error tree (retryable, permanent, environment);
- ``envelope``: the native event envelope, the Notification, ids and the idempotency-key chain;
- ``policy``: pure policy (preferences, channel decisions, rate limits, redaction,
  what may leave the system);
- ``metrics``: every metric, grouped per process and registered on first use;
- ``http``: the /metrics and /healthz server every long-running process runs.

Pieces that two upper layers share later (the signed unsubscribe token, ASGI helpers for
the receiver and the API) belong here too.
"""

# The one version string: pyproject.toml reads it (tool.setuptools.dynamic), herald --version prints it.
__version__ = "0.2.0"
