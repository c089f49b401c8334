"""Per-category choices and mandatory categories in pure policy (no I/O)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from config.settings import PolicySettings
from core.policy import Preferences, plan
from tests.test_policy_unit import ALL_ON, note

SECURITY = PolicySettings(mandatory_categories=frozenset({"security"}))


def test_a_category_turned_off_for_a_channel_stops_only_that_channel() -> None:
    prefs = replace(ALL_ON, categories={"billing": {"email": False}})
    assert [d.channel for d in plan(note(category="billing"), prefs)] == ["push", "webhook"]
    assert [d.channel for d in plan(note(category="jobs"), prefs)] == ["email", "push", "webhook"]
    assert [d.channel for d in plan(note(), prefs)] == ["email", "push", "webhook"]


def test_a_category_cannot_turn_on_a_channel_that_is_off() -> None:
    prefs = replace(ALL_ON, email=False, categories={"billing": {"email": True}})
    assert "email" not in [d.channel for d in plan(note(category="billing"), prefs)]


def test_a_category_turned_off_in_app_hides_it() -> None:
    prefs = replace(ALL_ON, categories={"social": {"in_app": False}})
    assert prefs.hidden("social") and not prefs.hidden("billing") and not prefs.hidden(None)


@pytest.mark.parametrize("stored", [{"security": {"email": False, "push": False, "in_app": False}}])
def test_mandatory_categories_ignore_the_users_opt_outs(stored: dict[str, dict[str, bool]]) -> None:
    prefs = Preferences.defaults(SECURITY).merged({"email": True, "push": True, "categories": stored})
    assert [d.channel for d in plan(note(category="security"), prefs)] == ["email", "push"]
    assert not prefs.hidden("security")


def test_mandatory_categories_are_never_hidden_even_with_in_app_off() -> None:
    prefs = Preferences.defaults(SECURITY).merged({"in_app": False})
    assert not prefs.hidden("security")
    assert prefs.hidden("billing") and prefs.hidden(None)


def test_the_mandatory_list_is_not_something_storage_can_change() -> None:
    prefs = Preferences.defaults(SECURITY).merged({"mandatory": frozenset()})
    assert prefs.mandatory == frozenset({"security"})
