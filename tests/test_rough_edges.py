"""The rough edges an operator hits: what a paused campaign shows, where a spec's JSON
breaks, and CLI errors in our words."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client

from campaigns.cli._progress import bar_rate
from campaigns.client import CampaignClient
from campaigns.models import CampaignState
from campaigns.settings import Settings
from campaigns.spec_check import InvalidSpec, parse_spec
from tests.helpers import SimulatorControl, make_spec
from tests.test_cli import campaigns as cli
from tests.test_cli import cli_env
from tests.test_controls import slow_campaign, until
from tests.test_local_stack import free_port

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def campaigns(client: Client, settings: Settings) -> CampaignClient:
    return CampaignClient(client, settings)


async def test_a_paused_campaign_shows_paused_and_no_rate_or_eta(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    _, handle, _ = await slow_campaign(pool, tmp_path, sim, campaigns)
    await until(handle, lambda s: s.counts.sent >= 50 and s.rate_per_second > 0)
    await campaigns.pause(handle.id)
    paused = await until(handle, lambda s: s.in_flight_batches == 0)

    assert paused.state is CampaignState.PAUSED
    assert paused.eta_seconds is None and paused.rate_per_second == 0
    assert bar_rate(paused) == "paused"
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    details = metadata.current_details  # what the Web UI shows on the workflow's page
    assert "paused" in details and "ETA" not in details and "emails/s" not in details

    await campaigns.resume(handle.id)
    result = await handle.result()
    assert result.state is CampaignState.COMPLETED


def test_a_json_syntax_error_in_a_spec_says_line_and_column() -> None:
    text = '{\n  "campaign_id": "spring",\n  "org": "acme",,\n}'
    with pytest.raises(InvalidSpec) as refused:
        parse_spec(text)
    assert "is not valid JSON" in str(refused.value)
    assert "line 3, column 17" in str(refused.value)
    json.loads('{"a": 1}')  # the locator agrees with json on valid text


async def test_cli_errors_are_our_words_without_class_names(
    campaigns: CampaignClient,
    settings: Settings,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
) -> None:
    env = cli_env(settings, tmp_path)
    # Paced to last half a minute: a CLI process starting on a busy machine must still
    # find it running.
    _, handle, _ = await slow_campaign(pool, tmp_path, sim, campaigns, rate_per_second=20)
    refused = await cli(env, "resume", handle.id)
    assert refused.returncode == 2
    assert refused.stderr.startswith("refused: cannot resume: the campaign is not paused")

    bad = tmp_path / "bad.json"
    bad.write_text('{"campaign_id": "x",\n "org": }')
    invalid = await cli(env, "validate", str(bad))
    assert invalid.returncode == 2 and "line 2, column 9" in invalid.stderr

    unreachable = await cli({**env, "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"}, "list")
    good = tmp_path / "good.json"
    good.write_text(make_spec("acme", "customers").model_dump_json())
    no_database = await cli(
        {**env, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x"},
        "validate",
        str(good),
    )
    for result in (refused, invalid, unreachable, no_database):
        assert result.returncode != 0
        for name in ("ControlRefused", "Error:", "Exception", "Traceback", "Errno"):
            assert name not in result.stderr, result.stderr
    assert "cannot reach Temporal" in unreachable.stderr
    assert "cannot reach the database" in no_database.stderr
    await campaigns.cancel(handle.id)  # nothing more to learn from it
