"""Checks of a campaign spec: its shape (pydantic) and what it names in the database.

The CLI runs both before it starts anything; the workflow's first activity runs the
database half again, so a spec started by other means (``temporal workflow start``,
the Python client) is held to the same rules.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from campaigns.contract import InvalidSpec, SpecProblem, problems_from_validation_error
from campaigns.models import (
    TEMPLATE_FIELDS,
    CampaignPlan,
    CampaignSpec,
    CampaignTemplates,
    send_at_problem,
)
from campaigns.store import audiences, ledger, orgs
from campaigns.store import campaigns as campaign_rows
from campaigns.store._pool import Conn
from campaigns.store.templates import load_templates
from campaigns.templates import BUILTIN_FIELDS, TemplateError, fields_used


def _json_problem(data: str | bytes) -> str:
    """Where JSON text stops being JSON: line, column and what was expected."""
    try:
        json.loads(data)
    except json.JSONDecodeError as error:
        return f"is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
    except ValueError:  # bytes that are not UTF-8
        return "is not valid JSON: it is not UTF-8 text"
    return "is not valid JSON"


def parse_spec(data: str | bytes | dict[str, Any]) -> CampaignSpec:
    """Parse JSON text or a dict into a spec.

    Raises:
        InvalidSpec: naming every field that is wrong.
    """
    try:
        if isinstance(data, dict):
            spec = CampaignSpec.model_validate(data)
        else:
            spec = CampaignSpec.model_validate_json(data)
    except ValidationError as exc:
        if not isinstance(data, dict) and any(
            item["type"] == "json_invalid" for item in exc.errors()
        ):
            raise InvalidSpec([SpecProblem("spec", _json_problem(data))]) from None
        raise InvalidSpec(problems_from_validation_error(exc)) from None
    templates = spec.templates()
    if templates is not None:
        _, problems = _template_fields(templates)
        if problems:
            raise InvalidSpec(problems)
    return spec


def check_timing(spec: CampaignSpec, now: datetime) -> None:
    """Refuse a ``send_at`` too far ahead, or already past by more than the lateness allowed.

    Raises:
        InvalidSpec: naming ``send_at``.
    """
    if spec.send_at is not None:
        problem = send_at_problem(spec.send_at, now, spec.max_lateness_seconds)
        if problem:
            raise InvalidSpec([SpecProblem("send_at", problem)])


def _template_fields(
    templates: CampaignTemplates,
) -> tuple[dict[str, set[str]], list[SpecProblem]]:
    """The merge fields each template uses, and the templates with a placeholder that
    is not a field name (refused when a spec starts)."""
    used: dict[str, set[str]] = {}
    problems = []
    for field_name in TEMPLATE_FIELDS:
        template = getattr(templates, field_name)
        try:
            used[field_name] = fields_used(template) if template else set()
        except TemplateError as exc:
            problems.append(SpecProblem(field_name, str(exc)))
    return used, problems


async def resolve_templates(conn: Conn, spec: CampaignSpec) -> CampaignTemplates:
    """The spec's templates: inline, or stored for its org under ``template_digest``.

    Raises:
        InvalidSpec: naming ``template_digest`` when the org has no such templates.
    """
    templates = spec.templates()
    if templates is not None:
        return templates
    assert spec.template_digest is not None  # the model holds one form or the other
    stored = await load_templates(conn, spec.org, spec.template_digest)
    if stored is None:
        raise InvalidSpec(
            [
                SpecProblem(
                    "template_digest",
                    f"org '{spec.org}' has no stored templates with this digest",
                )
            ]
        )
    return stored


async def check_against_database(
    conn: Conn,
    spec: CampaignSpec,
    *,
    workflow_id: str | None = None,
) -> CampaignPlan:
    """Check that the org, audience, templates and merge fields exist; return the send plan.

    With ``workflow_id``, also check that no other workflow owns the campaign id.

    Raises:
        InvalidSpec: naming every field that refers to something missing.
    """
    if not await orgs.exists(conn, spec.org):
        raise InvalidSpec([SpecProblem("org", f"unknown org '{spec.org}'")])
    audience = await audiences.by_name(conn, spec.org, spec.audience)
    if audience is None:
        raise InvalidSpec(
            [SpecProblem("audience", f"org '{spec.org}' has no audience named '{spec.audience}'")]
        )
    templates = await resolve_templates(conn, spec)
    known = BUILTIN_FIELDS | set(audience.merge_fields)
    used, problems = _template_fields(templates)
    for field_name, fields in used.items():
        unknown = sorted(fields - known)
        if unknown:
            names = ", ".join("{{ " + name + " }}" for name in unknown)
            problems.append(
                SpecProblem(
                    field_name,
                    f"unknown merge field {names}; audience '{spec.audience}' has: "
                    + ", ".join(sorted(known)),
                )
            )
    other = await campaign_rows.binding(conn, spec.campaign_id)
    if other is not None and (other.org_id, other.audience_id) != (spec.org, audience.id):
        problems.append(
            SpecProblem(
                "campaign_id",
                f"'{spec.campaign_id}' is already used by another campaign; "
                "choose another campaign_id",
            )
        )
    elif (
        other is not None
        and workflow_id is not None
        and other.workflow_id not in (None, workflow_id)
    ):
        assert other.workflow_id is not None
        problems.append(owned_by_another_workflow(spec.campaign_id, other.workflow_id))
    if problems:
        raise InvalidSpec(problems)
    if spec.send_to == "failed":
        total = await ledger.count_to_retry(conn, spec.campaign_id)
        if not total:
            raise InvalidSpec(
                [
                    SpecProblem(
                        "send_to",
                        f"campaign '{spec.campaign_id}' has no failed or abandoned recipients",
                    )
                ]
            )
    else:
        total = await audiences.count_recipients(conn, audience.id)
    return CampaignPlan(
        audience_id=audience.id, total_recipients=total, template_digest=templates.digest()
    )


def owned_by_another_workflow(campaign_id: str, owner: str) -> SpecProblem:
    """The problem of a campaign id that another workflow already sends."""
    return SpecProblem(
        "campaign_id",
        f"'{campaign_id}' belongs to workflow '{owner}'; a campaign id has one workflow "
        f"(its ledger counts every recipient once): use workflow id '{owner}' "
        "or a new campaign_id",
    )
