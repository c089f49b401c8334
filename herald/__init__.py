"""herald: Kafka events in, notifications out; never lost, never duplicated."""

__version__ = "0.1.0"
