"""Kafka consumers: the batch loop and the processes built on it."""
