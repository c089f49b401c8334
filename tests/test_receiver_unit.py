"""What the receiver puts on a record, and which content types it takes (pure)."""

from __future__ import annotations

import hashlib

import pytest

from config.settings import SourceSettings
from producers.receiver import is_json, record_headers, record_key, source


@pytest.mark.parametrize(
    "ctype, ok",
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("application/cloudevents+json", True),
        ("application/vnd.acme+json; v=2", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("text/json+xml", False),
        ("", False),
        (None, False),
    ],
)
def test_json_content_types(ctype: str | None, ok: bool) -> None:
    assert is_json(ctype) is ok


def test_key_is_source_and_event_id_else_the_body_hash() -> None:
    assert record_key("gh", "d-1", b"{}") == b"gh:d-1"
    assert record_key("open", None, b"{}") == f"open:sha256:{hashlib.sha256(b'{}').hexdigest()}".encode()


def test_headers_forwarded_by_scheme_and_setting_never_the_signature() -> None:
    gh = source("gh", SourceSettings(scheme="github", secrets=["s"], forward_headers=["X-Trace"]))  # type: ignore[list-item]
    request = {
        "x-github-event": "issue_comment",
        "x-github-delivery": "d-1",
        "x-hub-signature-256": "sha256=00",
        "x-trace": "t-1",
        "user-agent": "GitHub-Hookshot/1",
        "ce-id": "ce-1",
        "ce-specversion": "1.0",
    }
    got = record_headers(gh, request, "application/json")
    assert got[:2] == [("herald-source", b"gh"), ("content-type", b"application/json")]
    assert dict(got[2:]) == {
        "X-GitHub-Event": b"issue_comment",
        "X-GitHub-Delivery": b"d-1",
        "X-Trace": b"t-1",
        "ce_id": b"ce-1",  # the HTTP binding's ce- becomes the Kafka binding's ce_
        "ce_specversion": b"1.0",
    }
