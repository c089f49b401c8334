"""herald: Kafka events in, notifications out; never lost, never duplicated.

This package is the composition root (the CLI, ``herald dev``, the demo, the benchmarks,
process wiring). Nothing imports it.
"""

from core import __version__

__all__ = ["__version__"]
