"""Preferences set through the API change what ingest delivers, end to end: a category turned
off stops its external deliveries (and, for in-app, hides it); a mandatory one cannot be
turned off through the API, and an opt-out stored before it became mandatory is ignored."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from herald.inspect import read_topic
from producers.topics import Topics
from tests.api_support import api_settings, client, running_api
from tests.helpers import event, ingest, produce

if TYPE_CHECKING:
    from tests.conftest import Backend

pytestmark = pytest.mark.integration


def test_category_choices_change_what_ingest_delivers(backend: Backend, db: psycopg.Connection[Any]) -> None:
    settings = api_settings(backend.bootstrap, backend.database_url)
    user = f"p-{uuid.uuid4().hex[:8]}"
    with running_api(settings) as base, client(base, user) as c:
        r = c.put(
            "/v1/preferences",
            json={
                "channels": {"email": True, "push": True},
                "categories": {"billing": {"email": False}, "social": {"in_app": False}},
            },
        )
        assert r.status_code == 200, r.text
        refused = c.put("/v1/preferences", json={"categories": {"security": {"email": False}}})
        assert refused.status_code == 422
        # An opt-out stored before "security" became mandatory (written around the API):
        db.execute(
            "UPDATE notification_preferences SET categories = categories || %s::jsonb WHERE user_id = %s",
            (json.dumps({"security": {"email": False, "push": False, "in_app": False}}), user),
        )
        events = {
            cat: event(user_id=user, severity="critical", category=cat, title=f"about {cat}")
            for cat in ("billing", "jobs", "security", "social")
        }
        ingest(settings, produce(settings, events.values()))
        unread = c.get("/v1/notifications/unread-count").json()["count"]
        titles = sorted(i["title"] for i in c.get("/v1/notifications").json()["items"])

    rows = db.execute(
        "SELECT n.category, d.channel FROM deliveries d JOIN notifications n ON n.id = d.notification_id"
        " WHERE n.user_id = %s ORDER BY 1, 2",
        (user,),
    ).fetchall()
    by_category: dict[str, list[str]] = {}
    for category, channel in rows:
        by_category.setdefault(category, []).append(channel)
    assert by_category == {
        "billing": ["push"],  # email off for billing
        "jobs": ["email", "push"],
        "security": ["email", "push"],  # mandatory: the stored opt-out is ignored
        "social": ["email", "push"],  # only in-app was turned off for social
    }
    # the delivery records on the topic say the same
    topics = Topics(settings.topic_prefix)
    sent = [json.loads(r.value or b"") for r in read_topic(settings, topics.deliveries("email"))]
    assert sorted(d["category"] for d in sent if d["user_id"] == user) == ["jobs", "security", "social"]
    # social is stored but hidden from the inbox; the mandatory category is not hidden
    hidden = dict(
        db.execute("SELECT category, hidden FROM notifications WHERE user_id = %s", (user,)).fetchall()
    )
    assert hidden == {"billing": False, "jobs": False, "security": False, "social": True}
    assert unread == 3 and titles == ["about billing", "about jobs", "about security"]
