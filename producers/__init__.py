"""Kafka producers: topic layout, the publisher seam, and the HTTP receiver."""
