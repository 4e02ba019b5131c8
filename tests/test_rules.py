"""The pure rules behind the hostile-input checks: fast, no server needed."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from activities.planning import scope_problem
from campaigns.models import CampaignTemplates, rate_problem, send_at_problem
from campaigns.safe_text import control_character_problem, replace_control_characters

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("rate", [None, 0.5, 1, 1_000_000])
def test_finite_positive_rates_up_to_the_maximum_are_accepted(rate: float | None) -> None:
    assert rate_problem(rate) is None


@pytest.mark.parametrize("rate", [0, -1, math.nan, math.inf, -math.inf, 1_000_001, True])
def test_other_rates_are_refused_with_the_range(rate: float) -> None:
    problem = rate_problem(rate)
    assert problem is not None and problem.startswith("rate must be")


def test_send_at_is_bounded_on_both_sides() -> None:
    assert send_at_problem(NOW + timedelta(days=366), NOW, 3600) is None
    assert "366 days ahead" in (send_at_problem(NOW + timedelta(days=367), NOW, 3600) or "")
    assert send_at_problem(NOW - timedelta(seconds=3600), NOW, 3600) is None
    assert "expire" in (send_at_problem(NOW - timedelta(seconds=3601), NOW, 3600) or "")
    assert "timezone" in (send_at_problem(datetime(2027, 1, 1), NOW, 3600) or "")


def test_scope_allows_only_the_campaigns_own_org_and_audience() -> None:
    stored = ("acme", 7)
    assert scope_problem("c", stored, "acme", 7) is None
    assert scope_problem("c", stored, None, 7) is None  # a run of an older version
    assert "another org" in (scope_problem("c", stored, "victim", 7) or "")
    assert "not the audience" in (scope_problem("c", stored, "acme", 8) or "")
    assert "not prepared" in (scope_problem("c", None, "acme", 7) or "")


def test_a_template_digest_never_changes_for_the_same_text() -> None:
    # Stored references name templates by this digest: changing how it is computed
    # would orphan every stored reference.
    templates = CampaignTemplates(subject="Hi {{ name }}", html="<p>é</p>", text=None)
    assert templates.digest() == (
        "sha256:91c2f461f71ca9d9aa65096f7d0aef85d356a877755f76581a896da4e9bbcda9"
    )
    assert templates.digest() != CampaignTemplates(subject="Hi", html="<p>é</p>").digest()


@pytest.mark.parametrize("text", ["a\rb", "a\nb", "a\x1bb", "a\x7fb", "a\u2028b", "a\x85b"])
def test_control_characters_are_found_and_replaced(text: str) -> None:
    assert control_character_problem(text) is not None
    assert replace_control_characters(text) == "a b"


def test_printable_text_passes_unchanged() -> None:
    text = "Ünïcode, emoji 🎉 and tabs are not here"
    assert control_character_problem(text) is None
    assert replace_control_characters(text) is text
