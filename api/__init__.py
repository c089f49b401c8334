"""The HTTP API and the notification center page (inbox, preferences, unsubscribe).

Layer: beside ``consumers``, independent of it; imports ``storage``, ``producers``,
``channels``, ``core`` and ``config`` (see the import-linter contract in pyproject.toml).
"""
