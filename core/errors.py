"""One root exception, split into retryable and permanent.

Adapters translate psycopg, HTTP and Kafka errors at their boundary
(``raise ... from exc``), so the loops only ever catch these. Three families
decide what a loop does with a failed batch:

- the record's fault (``RecordRejected``, ``InvalidEvent``): that record goes to a
  dead-letter topic, its batch mates are stored;
- a passing outage (``DatabaseUnavailable``, ``BrokerUnavailable``): keep the batch,
  retry with backoff;
- the environment is wrong (``EnvironmentProblem``: a missing table, privileges, a
  read-only server, an unknown topic): keep the batch, retry with an alarm, and say
  in one line what an operator must do. Never dead-letter: the records are fine.
"""

from __future__ import annotations


class HeraldError(Exception):
    """Root of every error herald raises on purpose."""


class RetryableError(HeraldError):
    """The same work may succeed later: an outage, a timeout, a lost lock."""


class PermanentError(HeraldError):
    """Retrying the same input will fail the same way."""


class DatabaseUnavailable(RetryableError):
    """PostgreSQL cannot be reached or dropped the connection."""


class BrokerUnavailable(RetryableError):
    """The broker did not acknowledge records in time."""


class EnvironmentProblem(RetryableError):
    """Not the record's fault and not passing by itself: an operator must act (``hint`` says how)."""

    system = "environment"

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message} ({hint})")
        self.hint = hint


class DatabaseMisconfigured(EnvironmentProblem):
    """Undefined table or column, missing privileges, read-only after a failover, authentication."""

    system = "database"


class BrokerMisconfigured(EnvironmentProblem):
    """Unknown topic, topic authorization, or a broker limit the records cannot meet."""

    system = "broker"


class FatalBrokerError(PermanentError):
    """The client can never work as configured (authentication, group authorization): stop."""


class RecordRejected(PermanentError):
    """PostgreSQL refused a record's data (data exception, integrity, program limit)."""


class AssignmentLost(RetryableError):
    """The group rebalanced under us: drop the batch in hand, uncommitted."""


class InvalidEvent(PermanentError):
    """A record that can never become a notification. ``reason`` is a short code."""

    reason = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotJson(InvalidEvent):
    reason = "not_json"


class NotAnObject(InvalidEvent):
    reason = "not_object"


class SchemaViolation(InvalidEvent):
    reason = "schema"


class TooLarge(InvalidEvent):
    reason = "too_large"


class ConfigError(PermanentError):
    """Settings or a file they name cannot be used."""


class Unmapped(InvalidEvent):
    """Neither a native envelope nor a CloudEvent, and no mapping rule matched."""

    reason = "unmapped"


class MappingFailed(InvalidEvent):
    """A rule matched but could not map the record (a missing field, a value not in a lookup)."""

    reason = "mapping"


class NoRecipients(InvalidEvent):
    """A rule matched and mapped the record, but every recipient list was empty."""

    reason = "no_recipients"
