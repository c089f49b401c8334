"""schemathesis against the API's own OpenAPI document (/openapi.json), over real HTTP.

Every operation gets generated inputs, valid and invalid; every answer must be a non-5xx
status the document declares for it, with the declared content type and a body that
matches the declared schema. The number of examples is bounded to keep the suite fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from api.openapi import document
from config.settings import ApiSettings
from tests.api_support import add_notifications, api_settings, bearer, running_api

if TYPE_CHECKING:
    from tests.conftest import Backend

pytestmark = pytest.mark.integration

USER = "schemathesis-user"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_base(backend: Backend) -> Iterator[str]:
    with psycopg.connect(backend.database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM notifications WHERE user_id = %s", (USER,))
        add_notifications(conn, USER, 40, category=["billing", None] * 20, body="body text")
    with running_api(api_settings(backend.bootstrap, backend.database_url)) as base:
        yield base


# The document as the code builds it, loaded at collection time (schemathesis' fixture-based
# loader does not work with pytest 9); test_the_served_document_is_this_one ties the two.
DOCUMENT = document(ApiSettings())
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_served_document_is_this_one(api_base: str) -> None:
    assert httpx.get(f"{api_base}/openapi.json").json() == json.loads(json.dumps(DOCUMENT))


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_answer_matches_the_document(case: Any, api_base: str) -> None:
    case.call_and_validate(base_url=api_base, headers=bearer(USER), checks=CHECKS)
