"""Delivery providers (outbound webhook, SMTP, Web Push) behind one small protocol.

Layer: imports only ``config`` and ``core`` (see the import-linter contract in
pyproject.toml). The channel consumers in ``consumers/`` drive them.
"""
