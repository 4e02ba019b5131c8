"""The CLIs against the real stack: ours (`campaigns`) and the official `temporal`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import asyncpg
import pytest
from temporalio.client import Client, WorkflowFailureError

from campaigns.binaries import temporal_cli
from campaigns.models import CampaignState, CampaignStatus
from campaigns.settings import Settings
from tests.helpers import SimulatorControl, addresses, make_audience, make_org, make_spec
from workflows import CampaignWorkflow

pytestmark = pytest.mark.usefixtures("worker")


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def cli_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "CAMPAIGNS_TASK_QUEUE": settings.task_queue,
        "DATABASE_URL": settings.database_url or "",
        "CAMPAIGNS_DATA_DIR": str(tmp_path / "data"),  # no local stack state
        "COLUMNS": "200",
    }


async def run(*argv: str, env: dict[str, str] | None = None) -> Result:
    """Run a command without blocking the event loop (the test worker lives in it)."""
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    return Result(process.returncode or 0, stdout.decode(), stderr.decode())


async def campaigns(env: dict[str, str], *args: str) -> Result:
    return await run(sys.executable, "-m", "campaigns.cli", *args, env=env)


async def temporal_start(settings: Settings, workflow_id: str, *inputs: str) -> Result:
    """`temporal workflow start` of a campaign, as a user of the official CLI types it,
    with one ``--input`` per value in ``inputs`` (a spec's JSON, usually)."""
    return await run(
        temporal_cli(),
        "workflow",
        "start",
        "--address",
        settings.temporal_address,
        "--type",
        "CampaignWorkflow",
        "--task-queue",
        settings.task_queue,
        "--workflow-id",
        workflow_id,
        *(item for value in inputs for item in ("--input", value)),
    )


async def test_start_validates_first_and_names_the_field(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("clival", 5))
    spec = make_spec(org, audience).model_dump(mode="json")
    env = cli_env(settings, tmp_path)

    for changes, expected in [
        ({"batch_size": 101}, "batch_size: Input should be less than or equal to 100"),
        ({"audience": "ghost"}, f"audience: org '{org}' has no audience named 'ghost'"),
        ({"html": "{{ shoe_size }}"}, "html: unknown merge field {{ shoe_size }}"),
        ({"html": "{{ first name }}"}, "html: '{{ first name }}' is not a merge field"),
        ({"from_address": "nobody"}, "from_address: 'nobody' is not a valid sender"),
    ]:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**spec, **changes}))
        result = await campaigns(env, "start", str(path))
        assert result.returncode == 2, result.stderr
        assert expected in " ".join(result.stderr.split()), result.stderr
    listed = await campaigns(env, "list", "--json")
    assert spec["campaign_id"] not in listed.stdout  # nothing was started


async def test_start_status_and_list_through_our_cli(
    settings: Settings, client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("cli", 150))
    spec = make_spec(org, audience)
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    env = cli_env(settings, tmp_path)

    started = await campaigns(env, "start", str(path))

    assert started.returncode == 0, started.stderr
    assert f"workflow id  {spec.campaign_id}" in started.stdout
    assert f"/namespaces/default/workflows/{spec.campaign_id}" in started.stdout
    await client.get_workflow_handle(spec.campaign_id).result()
    status = await campaigns(env, "status", spec.campaign_id, "--json")
    assert status.returncode == 0, status.stderr
    snapshot = CampaignStatus.model_validate_json(status.stdout)
    assert snapshot.state is CampaignState.COMPLETED and snapshot.counts.sent == 150
    watched = await campaigns(env, "status", spec.campaign_id)  # the live view ends at once
    assert watched.returncode == 0 and "Completed" in watched.stdout
    listed = json.loads((await campaigns(env, "list", "--json", "--org", org)).stdout)
    assert [(row["workflow_id"], row["state"]) for row in listed] == [
        (spec.campaign_id, "Completed")
    ]


async def test_the_same_json_starts_through_the_official_temporal_cli(
    settings: Settings, client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    emails = addresses("tcli", 80)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    spec = make_spec(org, audience)
    spec_json = spec.model_dump_json()

    result = await temporal_start(settings, spec.campaign_id, spec_json)
    assert result.returncode == 0, result.stderr

    final = await client.get_workflow_handle(spec.campaign_id, result_type=CampaignStatus).result()
    assert final.state is CampaignState.COMPLETED
    assert final.counts.sent == 80
    delivered = await sim.deliveries()
    assert sorted(delivered) == sorted(emails)
    queried = await client.get_workflow_handle(spec.campaign_id).query(CampaignWorkflow.status)
    assert queried.counts.sent == 80


async def test_an_invalid_spec_through_the_official_cli_fails_at_once_naming_the_field(
    settings: Settings, client: Client, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("tbad", 5))
    spec = make_spec(org, audience).model_dump(mode="json")
    spec["batch_size"] = 101

    result = await temporal_start(settings, spec["campaign_id"], json.dumps(spec))
    assert result.returncode == 0, result.stderr

    handle = client.get_workflow_handle(spec["campaign_id"])
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), timeout=60)
    assert "batch_size" in str(failure.value.cause)
    assert failure.value.cause.type == "InvalidCampaignSpec"


async def test_cli_import_reports_bad_rows(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    path = tmp_path / "list.csv"
    path.write_text("email,name\nok@example.com,Ok\nnope,Bad\nok@example.com,Dup\n")
    env = cli_env(settings, tmp_path)

    result = await campaigns(env, "audience", "import", "--org", org, "--name", "list", str(path))

    assert result.returncode == 0, result.stderr
    assert "1 new" in result.stdout and "2 left out" in result.stdout
    assert "line 3: invalid email address 'nope'" in result.stdout
    assert "line 4: duplicate of line 2 (ok@example.com)" in result.stdout


async def test_cli_import_renames_headers_and_reports_undecodable_rows(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    path = tmp_path / "list.csv"
    path.write_bytes(b"email,first name\nok@example.com,Ok\nlatin@example.com,Jos\xe9\n")
    env = cli_env(settings, tmp_path)

    result = await campaigns(env, "audience", "import", "--org", org, "--name", "list", str(path))

    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "1 new" in out and "1 left out" in out
    assert "renamed columns to merge-field names: 'first name' -> first_name" in out
    assert "line 3: column 'first name' is not valid UTF-8 (byte 0xE9)" in out


async def test_cli_controls_report_refusals_clearly(
    settings: Settings, client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("clictl", 20))
    spec = make_spec(org, audience)
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    env = cli_env(settings, tmp_path)
    assert (await campaigns(env, "start", str(path))).returncode == 0
    await client.get_workflow_handle(spec.campaign_id).result()

    refused = await campaigns(env, "pause", spec.campaign_id)
    assert refused.returncode == 2
    assert "has finished" in refused.stderr
    missing = await campaigns(env, "resume", "no-such-campaign")
    assert missing.returncode == 2 and "no campaign workflow" in missing.stderr
    nothing = await campaigns(env, "throttle", spec.campaign_id)
    assert nothing.returncode == 2 and "--window, --rate or --no-rate" in nothing.stderr
    bad_time = await campaigns(env, "reschedule", spec.campaign_id, "--at", "tomorrow")
    assert bad_time.returncode == 2 and "not an ISO 8601" in bad_time.stderr
    retry = await campaigns(env, "retry-failed", spec.campaign_id)
    assert retry.returncode == 2 and "no failed or abandoned recipients" in retry.stderr


async def test_controls_and_status_through_the_official_temporal_cli(
    settings: Settings, client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    emails = addresses("tctl", 400)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    await sim.configure(latency_ms=80)
    spec = make_spec(org, audience, window=1, recipients_per_activity=50)
    await run(
        temporal_cli(), "workflow", "start", "--address", settings.temporal_address,
        "--type", "CampaignWorkflow", "--task-queue", settings.task_queue,
        "--workflow-id", spec.campaign_id, "--input", spec.model_dump_json(),
    )  # fmt: skip

    async def temporal(*args: str) -> Result:
        result = await run(
            temporal_cli(), "workflow", *args, "--address", settings.temporal_address,
            "--workflow-id", spec.campaign_id, "--output", "json",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result

    paused = json.loads((await temporal("update", "execute", "--name", "pause")).stdout)
    assert paused["result"]["controls"]["paused"] is True
    await temporal("update", "execute", "--name", "set_window", "--input", "3")
    refused = await run(
        temporal_cli(), "workflow", "update", "execute", "--name", "set_window",
        "--input", "0", "--address", settings.temporal_address, "--workflow-id", spec.campaign_id,
    )  # fmt: skip
    assert refused.returncode != 0 and "window must be between 1 and 500" in refused.stderr
    status = json.loads((await temporal("query", "--name", "status")).stdout)
    assert status["queryResult"][0]["controls"] == {
        "paused": True, "cancel_requested": False, "window": 3,
        "rate_per_second": None, "send_at": None, "pause_reason": None, "priority": 3,
    }  # fmt: skip
    await temporal("update", "execute", "--name", "resume")

    final = await client.get_workflow_handle(spec.campaign_id, result_type=CampaignStatus).result()
    assert final.counts.sent == 400 and final.controls.window == 3
