"""Spec validation: refused before anything starts, with the field named."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest

from campaigns.spec_check import InvalidSpec, check_against_database, parse_spec
from tests.helpers import addresses, make_audience, make_org

VALID = {
    "campaign_id": "spring-sale",
    "org": "acme",
    "audience": "customers",
    "from_address": "Acme <news@acme.example>",
    "subject": "Hi {{ name }}",
    "html": "<p>Hello</p>",
}


def problems_of(**changes: object) -> dict[str, str]:
    data = {**VALID, **changes}
    data = {key: value for key, value in data.items() if value is not None}
    with pytest.raises(InvalidSpec) as error:
        parse_spec(json.dumps(data))
    return {problem.field: problem.message for problem in error.value.problems}


def test_valid_spec_parses() -> None:
    spec = parse_spec(json.dumps(VALID))
    assert spec.batch_size == 100 and spec.retry_delays_seconds == [300, 900, 2700, 8100]


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"batch_size": 500}, "batch_size", "less than or equal to 100"),
        ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
        ({"from_address": "Acme <not an address>"}, "from_address", "not a valid sender"),
        ({"from_address": "acme.example"}, "from_address", "not a valid sender"),
        ({"subject": "   "}, "subject", "must not be empty"),
        ({"html": ""}, "html", "must not be empty"),
        ({"subject": "Hi {{ name"}, "subject", "unclosed"),
        ({"html": "<p>{{ first name }}</p>"}, "html", "'{{ first name }}' is not a merge field"),
        ({"text": "{{zip-code}}"}, "text", "'{{zip-code}}' is not a merge field"),
        (
            {"html": "{{ first name }}, {{ name }} {{zip-code}}"},
            "html",
            "'{{ first name }}' and '{{zip-code}}' are not merge fields",
        ),
        ({"subject": "Hi {{ 1st }}"}, "subject", "'{{ 1st }}' is not a merge field"),
        ({"subject": "Hi {{ }}"}, "subject", "'{{ }}' is not a merge field"),
        ({"window": 5000}, "window", "less than or equal to 500"),
        ({"campaign_id": "has spaces"}, "campaign_id", "should match pattern"),
        ({"retry_delays_seconds": [0]}, "retry_delays_seconds.0", "greater than or equal to 1"),
        ({"bogus": 1}, "bogus", "not a known field"),
        ({"org": None}, "org", "Field required"),
    ],
)
def test_bad_fields_are_named(changes: dict, field: str, fragment: str) -> None:
    problems = problems_of(**changes)
    assert field in problems, problems
    assert fragment in problems[field]


def test_missing_body_is_refused() -> None:
    problems = problems_of(html=None)
    assert "an 'html' or a 'text' body" in problems["spec"]


def test_not_json_is_refused() -> None:
    with pytest.raises(InvalidSpec, match="not valid JSON"):
        parse_spec("{campaign_id: ")


async def test_database_checks_name_the_field(pool: asyncpg.Pool, tmp_path: Path) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("val", 3))
    good = parse_spec(json.dumps({**VALID, "org": org, "audience": audience}))
    plan = await check_against_database(pool, good)
    assert plan.total_recipients == 3

    cases = [
        ({"org": "nope"}, "org", "unknown org 'nope'"),
        ({"audience": "nope"}, "audience", "has no audience named 'nope'"),
        ({"subject": "Hi {{ nickname }}"}, "subject", "unknown merge field {{ nickname }}"),
        ({"text": "{{ city }} {{ zip }}"}, "text", "unknown merge field {{ zip }}"),
    ]
    for changes, field, fragment in cases:
        spec = parse_spec(json.dumps({**VALID, "org": org, "audience": audience, **changes}))
        with pytest.raises(InvalidSpec) as error:
            await check_against_database(pool, spec)
        messages = {problem.field: problem.message for problem in error.value.problems}
        assert fragment in messages[field], messages


def test_non_field_placeholders_are_refused_at_start_but_old_specs_still_decode() -> None:
    from campaigns.models import CampaignSpec
    from campaigns.templates import compile_template

    old = {**VALID, "html": "<p>{{ first name }}, {{ name }}</p>"}
    with pytest.raises(InvalidSpec, match="is not a merge field"):
        parse_spec(json.dumps(old))
    # A spec stored (or a workflow input recorded) before the rule decodes as before,
    # and its placeholder renders as the literal text it always did.
    stored = CampaignSpec.model_validate(old)
    rendered = compile_template(stored.html, html_body=True).render({"name": "Ada"})
    assert rendered == "<p>{{ first name }}, Ada</p>"
