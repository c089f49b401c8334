"""``herald bench …``: one module per benchmark, sharing ``common`` (stack, timing, JSON line).

Benchmarks start their own embedded stack unless ``HERALD_KAFKA_BOOTSTRAP`` and
``HERALD_DATABASE_URL`` both point at an existing one.
"""
