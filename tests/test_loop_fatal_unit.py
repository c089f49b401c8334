"""Fatal consumer errors stop the loop with one line and fail /healthz; others do not.

Pure: the consumer points at a closed port, so librdkafka's own errors there are
transport errors (not fatal), and a fatal one is handed to the loop the way
librdkafka's ``error_cb`` would.
"""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from config.settings import Settings
from consumers.loop import BatchLoop, fatal_error, is_fatal
from core.errors import FatalBrokerError
from herald.embedded import free_port


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    ],
)
def test_authentication_and_authorization_are_fatal(code: int) -> None:
    assert is_fatal(KafkaError(code, "refused"))


def test_an_error_librdkafka_marks_fatal_is_fatal() -> None:
    assert is_fatal(KafkaError(KafkaError._FATAL, "fenced", fatal=True))


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._MSG_TIMED_OUT,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.NOT_COORDINATOR,
        KafkaError._PARTITION_EOF,
    ],
)
def test_passing_errors_are_not_fatal(code: int) -> None:
    assert not is_fatal(KafkaError(code, "passing"))


def test_fatal_error_is_one_line_with_what_to_do() -> None:
    auth = str(fatal_error("ingest", KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error")))
    assert "\n" not in auth
    assert auth.startswith("ingest: fatal broker error _AUTHENTICATION: SASL authentication error")
    assert "HERALD_KAFKA__SASL_*" in auth
    group = str(fatal_error("ingest", KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED, "denied")))
    assert "grant this principal READ" in group


def loop_on_closed_port() -> BatchLoop:
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", batch_time_ms=100, metrics_port=-1)
    return BatchLoop(settings, name="ingest", group="g-fatal", topics=["t.events"], handler=lambda _: None)


def test_passing_client_errors_keep_the_loop_running() -> None:
    loop = loop_on_closed_port()
    stats = loop.run(timeout=1.0)  # connection refused all along: the loop just keeps polling
    assert stats.messages == 0
    assert loop.health.ok()


def test_fatal_client_error_fails_health_and_leaves_run() -> None:
    loop = loop_on_closed_port()
    # What librdkafka's error_cb hands over when the broker rejects the SASL handshake.
    loop._on_client_error(KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error"))
    with pytest.raises(FatalBrokerError, match="_AUTHENTICATION"):
        loop.run(timeout=30.0)
    assert not loop.health.ok()
    assert loop.health.status().startswith("failed: ingest: fatal broker error _AUTHENTICATION")
    assert loop.stopper.stopping  # the worker's retries stop too
