"""Hostile and careless workflow inputs, on the real stack.

Anyone who can reach Temporal can start a ``CampaignWorkflow`` with any JSON. These
tests start them the way such a user would (the official ``temporal`` CLI, the raw
Temporal client) and check that each is refused at once with a message that names
what is wrong, and that no input can make one org's campaign read another org's
recipients, suppressions or ledger.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError

from activities.planning import PlanningActivities
from activities.sending import SendingActivities
from campaigns.audience_import import import_audience
from campaigns.binaries import temporal_cli
from campaigns.client import CampaignClient, CampaignNotFound, ControlRefused
from campaigns.models import (
    AbandonFailedInput,
    BatchRange,
    CampaignState,
    CampaignTemplates,
    PlanBatchesInput,
    SendBatchInput,
)
from campaigns.provider import ProviderClient
from campaigns.sender_identity import SendingDomains
from campaigns.settings import Settings
from campaigns.spec_check import InvalidSpec, check_timing, parse_spec
from campaigns.store.templates import store_templates
from campaigns.unsubscribe import UnsubscribeLinks
from tests.conftest import TASK_QUEUE, TEST_API_KEY
from tests.helpers import (
    SimulatorControl,
    addresses,
    make_audience,
    make_org,
    make_spec,
    unique,
)
from tests.test_cli import campaigns, cli_env, run, temporal_start
from tests.test_exactly_once import run_batch
from workflows import CampaignWorkflow

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def client_api(client: Client, settings: Settings) -> CampaignClient:
    return CampaignClient(client, settings)


async def temporal_workflow_start(settings: Settings, workflow_id: str, *inputs: str) -> None:
    """``temporal workflow start`` of a CampaignWorkflow with these ``--input`` values."""
    result = await temporal_start(settings, workflow_id, *inputs)
    assert result.returncode == 0, result.stderr


async def failure_of(handle: WorkflowHandle) -> ApplicationError:
    """The workflow's failure, waited for at most 60 s."""
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), timeout=60)
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError)
    return cause


async def ledger_rows(pool: asyncpg.Pool, campaign_id: str) -> int:
    return await pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE campaign_id = $1", campaign_id
    )


# -- 1. tenant isolation ---------------------------------------------------------------


async def test_a_hand_written_carried_state_is_refused_and_reaches_no_other_org(
    settings: Settings, client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    acme = await make_org(pool)
    victim = await make_org(pool)
    await make_audience(pool, tmp_path, acme, addresses("acme-own", 2))
    audience_name, report = await make_audience(pool, tmp_path, victim, addresses("victim", 2))
    spec = make_spec(acme, audience_name).model_dump(mode="json")
    spec["audience"] = "whatever"
    now = datetime.now(UTC).isoformat()
    spec["carried"] = {
        "execution_id": "x",
        "plan": {"audience_id": report.audience_id, "total_recipients": 2},
        "round": 0,
        "cursor": 0,
        "status": {
            "campaign_id": spec["campaign_id"],
            "org": acme,
            "state": "Running",
            "started_at": now,
        },
    }

    await temporal_workflow_start(settings, spec["campaign_id"], json.dumps(spec))
    handle = client.get_workflow_handle(spec["campaign_id"])
    cause = await failure_of(handle)

    assert cause.type == "InvalidCampaignSpec"
    assert "carried" in cause.message
    assert await sim.deliveries() == {}
    assert await ledger_rows(pool, spec["campaign_id"]) == 0


async def test_activities_refuse_rows_outside_the_campaigns_org_in_sql(
    pool: asyncpg.Pool, settings: Settings, sim: SimulatorControl, tmp_path: Path
) -> None:
    acme = await make_org(pool)
    victim = await make_org(pool)
    own, _ = await make_audience(pool, tmp_path, acme, addresses("scope-own", 3))
    _, other = await make_audience(pool, tmp_path, victim, addresses("scope-victim", 3))
    spec = make_spec(acme, own)
    plan = await PlanningActivities(pool).prepare_campaign(spec)
    provider = ProviderClient(settings.provider_base_url or "", SecretStr(TEST_API_KEY))
    domains = SendingDomains(settings.shared_sending_domain, settings.shared_tracking_host)
    sending = SendingActivities(
        pool, provider, domains, unsubscribe=UnsubscribeLinks.from_settings(settings)
    )
    try:
        for org, audience_id in ((acme, other.audience_id), (victim, plan.audience_id)):
            page = PlanBatchesInput(
                campaign_id=spec.campaign_id,
                org=org,
                audience_id=audience_id,
                source="audience",
                after_id=0,
                batch_size=10,
                max_batches=2,
            )
            with pytest.raises(ApplicationError) as refused:
                await PlanningActivities(pool).plan_batches(page)
            assert refused.value.type == "InvalidCampaignSpec" and refused.value.non_retryable

            batch = SendBatchInput(
                campaign_id=spec.campaign_id,
                org=org,
                execution_id="exec",
                audience_id=audience_id,
                source="audience",
                round=0,
                range=BatchRange(after_id=0, last_id=2**62, size=3),
                batch_size=10,
            )
            with pytest.raises(ApplicationError) as refused:
                await run_batch(sending, batch)
            assert refused.value.type == "InvalidCampaignSpec" and refused.value.non_retryable
    finally:
        await provider.aclose()
    assert await sim.deliveries() == {}
    # The ledger of a campaign is touched only under its own org.
    await pool.execute(
        """INSERT INTO deliveries (campaign_id, recipient_id, status, execution_id, round)
           SELECT $1, id, 'failed', 'exec', 0 FROM recipients WHERE audience_id = $2""",
        spec.campaign_id,
        plan.audience_id,
    )
    abandon = PlanningActivities(pool).abandon_failed
    assert await abandon(AbandonFailedInput(campaign_id=spec.campaign_id, org=victim)) == 0
    assert await abandon(AbandonFailedInput(campaign_id=spec.campaign_id, org=acme)) == 3


# -- 2. any input shape ends the workflow ----------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (("null",), "got null"),
        (("[]",), "got an array"),
        (('"spring"',), "got a string"),
        (("42",), "got a number"),
        ((), "got no input"),
        (('{"campaign_id": "a"}', '{"campaign_id": "b"}'), "got 2 inputs"),
    ],
    ids=["null", "array", "string", "number", "no-input", "two-inputs"],
)
async def test_any_input_shape_fails_the_workflow_at_once(
    settings: Settings, client: Client, inputs: tuple[str, ...], expected: str
) -> None:
    workflow_id = unique("shape")
    await temporal_workflow_start(settings, workflow_id, *inputs)

    cause = await failure_of(client.get_workflow_handle(workflow_id))

    assert cause.type == "InvalidCampaignSpec"
    assert "expected one JSON object, a campaign spec" in cause.message
    assert expected in cause.message


async def test_our_cli_answers_with_a_message_on_workflows_that_are_no_campaign(
    settings: Settings, client: Client, tmp_path: Path
) -> None:
    env = cli_env(settings, tmp_path)
    broken = unique("broken")
    await temporal_workflow_start(settings, broken, "null")
    await failure_of(client.get_workflow_handle(broken))
    stranger = unique("stranger")
    await client.start_workflow("SomethingElse", id=stranger, task_queue=unique("nobody"))

    # The campaign that failed on its input still has a summary to show.
    shown = await campaigns(env, "status", broken, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "Failed"
    for workflow_id, answer in ((broken, "has finished"), (stranger, "not a campaign")):
        commands = [["pause", workflow_id], ["cancel", workflow_id]]
        commands.append(["throttle", workflow_id, "--window", "4"])
        if workflow_id == stranger:
            commands += [["status", workflow_id], ["status", workflow_id, "--json"]]
        for command in commands:
            result = await campaigns(env, *command)
            assert result.returncode == 2, (command, result.stdout, result.stderr)
            assert "Traceback" not in result.stderr, (command, result.stderr)
            assert answer in result.stderr, (command, result.stderr)
    stranger_status = await campaigns(env, "status", stranger)
    assert "is a SomethingElse, not a campaign" in stranger_status.stderr
    await client.get_workflow_handle(stranger).terminate()


# -- 5. header injection ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"subject": "Hi\r\nBcc: x@evil.example"}, "subject"),
        ({"from_address": "Acme\r\nBcc: x@evil.example <news@acme.example>"}, "from_address"),
        ({"from_address": "news@acme.example\nBcc: x@evil.example"}, "from_address"),
        ({"reply_to": "help@acme.example\r\nBcc: x@evil.example"}, "reply_to"),
        ({"tags": {"source": "spring\r\nBcc: x@evil.example"}}, "tags"),
        ({"tags": {"a\nb": "spring"}}, "tags"),
    ],
)
def test_control_characters_in_header_fields_are_refused(
    changes: dict[str, Any], field: str
) -> None:
    spec = {**make_spec("acme", "customers").model_dump(mode="json"), **changes}
    with pytest.raises(InvalidSpec) as error:
        parse_spec(json.dumps(spec))
    problems = {problem.field: problem.message for problem in error.value.problems}
    assert field in problems and "control characters" in problems[field]


async def test_a_merge_value_with_line_breaks_stays_one_subject_line(
    client_api: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    path = tmp_path / "injection.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["email", "name", "city"], ["inj@example.com", "a\r\nBcc: x@evil.example", "Oslo"]]
        )
    audience = unique("aud")
    async with pool.acquire() as conn:
        await import_audience(conn, org, audience, path)
    spec = make_spec(org, audience)

    handle = await client_api.start(spec)
    result = await asyncio.wait_for(handle.result(), timeout=60)

    assert result.counts.sent == 1
    [message] = await sim.messages("inj@example.com")
    assert "\r" not in message["subject"] and "\n" not in message["subject"]
    assert message["subject"] == "Hello a  Bcc: x@evil.example"


# -- 7. bounded specs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"html": "x" * (512 * 1024 + 1)}, "html", "at most 524,288 bytes"),
        (
            {"html": "x" * (512 * 1024), "text": "y" * (512 * 1024), "subject": "z" * 10},
            "spec",
            "at most 1,048,576",
        ),
        ({"subject": "s" * 999}, "subject", "at most 998"),
        ({"tags": {f"t{n}": "v" for n in range(11)}}, "tags", "at most 10"),
        ({"tags": {"source": "v" * 257}}, "tags", "at most 256"),
        ({"campaign_id": "c" * 65}, "campaign_id", "should match pattern"),
        ({"org": "[/]"}, "org", "should match pattern"),
        ({"rate_per_second": 0}, "rate_per_second", "greater than 0"),
        ({"rate_per_second": 1e7}, "rate_per_second", "less than or equal to 1000000"),
        ({"max_lateness_seconds": 10**9}, "max_lateness_seconds", "less than or equal"),
    ],
)
def test_spec_sizes_and_ranges_are_bounded(
    changes: dict[str, Any], field: str, fragment: str
) -> None:
    spec = {**make_spec("acme", "customers").model_dump(mode="json"), **changes}
    with pytest.raises(InvalidSpec) as error:
        parse_spec(json.dumps(spec))
    problems = {problem.field: problem.message for problem in error.value.problems}
    assert field in problems, problems
    assert fragment in problems[field]


@pytest.mark.parametrize("rate", ["NaN", "Infinity", "-Infinity"])
def test_rates_that_are_not_finite_numbers_are_refused(rate: str) -> None:
    text = json.dumps(make_spec("acme", "customers").model_dump(mode="json"))
    text = text[:-1] + f', "rate_per_second": {rate}}}'
    with pytest.raises(InvalidSpec, match="rate_per_second"):
        parse_spec(text)


def test_send_at_must_be_neither_far_ahead_nor_long_past() -> None:
    now = datetime.now(UTC)
    for send_at, fragment in (
        (now + timedelta(days=400), "at most 366 days ahead"),
        (now - timedelta(hours=2), "would expire without sending"),
    ):
        spec = make_spec("acme", "customers", send_at=send_at)
        with pytest.raises(InvalidSpec, match=fragment):
            check_timing(spec, now)
    check_timing(make_spec("acme", "customers", send_at=now + timedelta(days=30)), now)


async def test_a_far_send_at_fails_the_workflow_and_a_live_rate_must_be_finite(
    client: Client, client_api: CampaignClient, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("far", 2))
    far = make_spec(org, audience, send_at=datetime.now(UTC) + timedelta(days=400))
    handle = await client.start_workflow(
        CampaignWorkflow.run, far, id=far.campaign_id, task_queue=TASK_QUEUE
    )
    cause = await failure_of(handle)
    assert cause.type == "InvalidCampaignSpec" and "366 days" in cause.message

    waiting = make_spec(org, audience, send_at=datetime.now(UTC) + timedelta(days=1))
    await client_api.start(waiting)
    for rate in (math.nan, math.inf, -1.0, 0.0, 2e6):
        with pytest.raises(ControlRefused, match="rate must be"):
            await client_api.set_rate(waiting.campaign_id, rate)
    with pytest.raises(ControlRefused, match="at most 366 days ahead"):
        await client_api.reschedule(waiting.campaign_id, datetime.now(UTC) + timedelta(days=500))
    status = await client_api.status(waiting.campaign_id)
    assert status.controls is not None and status.controls.rate_per_second is None
    await client_api.cancel(waiting.campaign_id)


async def test_templates_travel_through_history_at_most_once(
    client: Client,
    client_api: CampaignClient,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
) -> None:
    org = await make_org(pool)
    emails = addresses("big", 30)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    marker = "MARKER-" + unique("t")
    html = f"<p>{marker} {{{{ name }}}}</p>" + "<p>" + "lorem ipsum " * 30_000 + "</p>"

    # Through our client: the input carries a digest, no activity repeats the text.
    ours = make_spec(org, audience, html=html, recipients_per_activity=10, batches_per_run=2)
    handle = await client_api.start(ours)
    result = await asyncio.wait_for(handle.result(), timeout=90)
    assert result.counts.sent == 30 and result.runs >= 2
    message = (await sim.messages(emails[0]))[0]
    assert message["html"].startswith(f"<p>{marker} Reader 1</p>")
    async for execution in client.list_workflows(f"WorkflowId = '{ours.campaign_id}'"):
        history = await client.get_workflow_handle(
            ours.campaign_id, run_id=execution.run_id
        ).fetch_history()
        text = history.to_json()
        assert marker not in text
        assert len(text) < 200_000

    # Started by hand with the templates inline: they are in the start event only.
    by_hand = make_spec(org, audience, html=html)
    raw = await client.start_workflow(
        "CampaignWorkflow",
        by_hand.model_dump(mode="json", exclude_none=True),
        id=by_hand.campaign_id,
        task_queue=TASK_QUEUE,
    )
    await asyncio.wait_for(raw.result(), timeout=90)
    events = [event async for event in raw.fetch_history_events()]
    carrying = [
        event.event_type for event in events if marker.encode() in event.SerializeToString()
    ]
    assert len(carrying) == 1, carrying


# -- 10. one campaign id, one workflow -------------------------------------------------


async def test_a_second_workflow_for_the_same_campaign_id_is_refused(
    client: Client,
    client_api: CampaignClient,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("twice", 40))
    spec = make_spec(org, audience)
    first = await client_api.start(spec)
    assert (await asyncio.wait_for(first.result(), timeout=60)).counts.sent == 40

    with pytest.raises(InvalidSpec, match=f"belongs to workflow '{spec.campaign_id}'"):
        await client_api.start(spec, workflow_id=unique("other"))
    # Skipping our client's checks, the workflow itself refuses it.
    second = await client.start_workflow(
        CampaignWorkflow.run, spec, id=unique("other"), task_queue=TASK_QUEUE
    )
    cause = await failure_of(second)
    assert cause.type == "InvalidCampaignSpec" and "belongs to workflow" in cause.message

    assert await ledger_rows(pool, spec.campaign_id) == 40
    assert set((await sim.deliveries()).values()) == {1}
    # The same workflow id may run the campaign again: nothing is sent twice.
    again = await client_api.start(spec)
    rerun = await asyncio.wait_for(again.result(), timeout=60)
    assert rerun.state is CampaignState.COMPLETED and rerun.counts.skipped == 40


async def test_status_of_an_unknown_id_is_a_clear_refusal(client_api: CampaignClient) -> None:
    with pytest.raises(CampaignNotFound):
        await client_api.status(unique("missing"))


async def test_another_orgs_template_digest_names_nothing(
    client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    acme = await make_org(pool)
    victim = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, acme, addresses("digest-acme", 3))
    theirs = CampaignTemplates(subject="Their secret subject", text="Their secret body")
    digest = await store_templates(pool, victim, theirs)
    spec = make_spec(acme, audience).by_reference(digest)

    handle = await client.start_workflow(
        CampaignWorkflow.run, spec, id=spec.campaign_id, task_queue=TASK_QUEUE
    )
    cause = await failure_of(handle)

    assert cause.type == "InvalidCampaignSpec" and "template_digest" in cause.message
    assert await sim.deliveries() == {}


async def test_updates_of_the_wrong_shape_are_refused_and_the_campaign_runs_on(
    settings: Settings,
    client: Client,
    client_api: CampaignClient,
    pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("shapes", 2))
    spec = make_spec(org, audience, send_at=datetime.now(UTC) + timedelta(days=1))
    await client_api.start(spec)
    handle = client.get_workflow_handle(spec.campaign_id)

    for name, value in (
        ("set_rate", '"fast"'),
        ("set_rate", "[1, 2]"),
        ("set_window", '"wide"'),
        ("set_window", "100000"),
        ("reschedule", '"not a date"'),
        ("reschedule", "null"),
    ):
        result = await run(
            temporal_cli(),
            "workflow",
            "update",
            "execute",
            "--address",
            settings.temporal_address,
            "--workflow-id",
            spec.campaign_id,
            "--name",
            name,
            "--input",
            value,
        )
        assert result.returncode != 0, (name, value, result.stdout)

    status = await client_api.status(spec.campaign_id)
    assert status.state is CampaignState.SCHEDULED
    assert status.controls is not None and status.controls.window == spec.window
    events = [event async for event in handle.fetch_history_events()]
    assert not [e for e in events if e.HasField("workflow_task_failed_event_attributes")]
    await client_api.cancel(spec.campaign_id)
