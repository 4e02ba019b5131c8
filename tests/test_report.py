"""`campaigns report`: a campaign's ledger by status, its engagement counters and their
rates, read from PostgreSQL after the campaign's workflow closed."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client

from campaigns.client import CampaignClient, CampaignNotFound
from campaigns.models import (
    CampaignReport,
    CampaignState,
    EngagementCounts,
    LedgerCounts,
    ReportRates,
    report_rates,
)
from campaigns.settings import Settings
from campaigns.store import reports
from tests.helpers import SimulatorControl, addresses, make_audience, make_org, make_spec, unique
from tests.test_cli import campaigns as cli
from tests.test_cli import cli_env
from tests.test_reputation import apply_events


def test_rates_are_of_sent_or_of_delivered_and_zero_without_a_denominator() -> None:
    ledger = LedgerCounts(sent=200, failed=3)
    engagement = EngagementCounts(
        delivered=160, hard_bounced=10, soft_bounced=4, complained=2, opened=40, clicked=8,
        unsubscribed=1,
    )  # fmt: skip
    assert report_rates(ledger, engagement) == ReportRates(
        delivered=0.8,
        hard_bounced=0.05,
        soft_bounced=0.02,
        complained=2 / 160,
        opened=0.25,
        clicked=0.05,
        unsubscribed=1 / 160,
    )
    assert report_rates(LedgerCounts(), EngagementCounts()) == ReportRates()
    nothing_delivered = report_rates(LedgerCounts(sent=10), EngagementCounts(hard_bounced=5))
    assert nothing_delivered.hard_bounced == 0.5 and nothing_delivered.complained == 0.0


@pytest.fixture
def campaigns(client: Client, settings: Settings) -> CampaignClient:
    return CampaignClient(client, settings)


@pytest.mark.usefixtures("worker")
async def test_the_report_adds_the_counters_to_the_ledger_after_the_campaign_closed(
    campaigns: CampaignClient,
    settings: Settings,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
) -> None:
    org = await make_org(pool)
    emails = addresses("rpt", 200)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    await pool.executemany(
        "INSERT INTO suppressions (org_id, email, reason) VALUES ($1, $2, 'unsubscribed')",
        [(org, email) for email in emails[:2]],
    )
    await sim.configure(reject_addresses=[emails[10]])
    spec = make_spec(org, audience)
    handle = await campaigns.start(spec)
    result = await handle.result()
    assert result.state is CampaignState.COMPLETED and result.counts.sent == 197
    await apply_events(
        pool, spec.campaign_id, org, delivered=180, hard_bounced=10, soft_bounced=4,
        complained=3, opened=60, clicked=12, unsubscribed=1,
    )  # fmt: skip
    # Counters another org wrote for this campaign id are never added in.
    assert await reports.engagement(pool, spec.campaign_id, "another-org") == EngagementCounts()

    report = await campaigns.report(spec.campaign_id)

    assert report.campaign_id == spec.campaign_id and report.org == org
    assert report.ledger == LedgerCounts(sent=197, rejected=1, suppressed=2)
    assert report.engagement == EngagementCounts(
        delivered=180, hard_bounced=10, soft_bounced=4, complained=3, opened=60, clicked=12,
        unsubscribed=1,
    )  # fmt: skip
    assert report.rates.delivered == 180 / 197 and report.rates.hard_bounced == 10 / 197
    assert report.rates.complained == 3 / 180 and report.rates.clicked == 12 / 180

    # The CLI reads PostgreSQL only: no Temporal server (nor worker) at this address.
    env = {**cli_env(settings, tmp_path), "TEMPORAL_ADDRESS": "127.0.0.1:9"}
    as_json = await cli(env, "report", spec.campaign_id, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert CampaignReport.model_validate_json(as_json.stdout) == report
    assert json.loads(as_json.stdout)["rates"]["opened"] == pytest.approx(60 / 180)
    table = await cli(env, "report", spec.campaign_id)
    assert table.returncode == 0, table.stderr
    lines = {line.split("│")[1].strip(): line for line in table.stdout.splitlines() if "│" in line}
    assert "197" in lines["sent"] and "2" in lines["suppressed"]
    assert "91.37%" in lines["delivered"] and "sent" in lines["delivered"]  # 180 / 197
    assert "1.67%" in lines["complained"] and "delivered" in lines["complained"]  # 3 / 180
    assert "33.33%" in lines["opened"] and "6.67%" in lines["clicked"]
    assert "5.08%" in lines["hard bounced"] and "0.56%" in lines["unsubscribed"]


async def test_a_campaign_no_event_reached_yet_reports_zero_engagement(
    pool: asyncpg.Pool, settings: Settings, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("rptzero", 3))
    audience_id = await pool.fetchval(
        "SELECT id FROM audiences WHERE org_id = $1 AND name = $2", org, audience
    )
    campaign_id = unique("camp")
    await pool.execute(
        "INSERT INTO campaigns (id, org_id, audience_id, spec) VALUES ($1, $2, $3, '{}')",
        campaign_id,
        org,
        audience_id,
    )
    report = await reports.campaign_report(pool, campaign_id)
    assert report == CampaignReport.of(campaign_id, org, LedgerCounts(), EngagementCounts())
    assert report.rates == ReportRates()


async def test_an_unknown_campaign_id_is_named_in_the_refusal(
    campaigns: CampaignClient, settings: Settings, tmp_path: Path
) -> None:
    missing = unique("nosuch")
    with pytest.raises(CampaignNotFound, match=f"no campaign '{missing}' in the database"):
        await campaigns.report(missing)
    env = cli_env(settings, tmp_path)
    refused = await cli(env, "report", missing)
    assert refused.returncode == 2 and f"no campaign '{missing}'" in refused.stderr
    assert "Traceback" not in refused.stderr
    bad = await cli(env, "report", "../etc\x1b[31m")
    assert bad.returncode == 2 and "is not a campaign id" in bad.stderr
    assert "\x1b" not in bad.stderr
    with pytest.raises(CampaignNotFound, match="is not a campaign id"):
        await campaigns.report("x" * 10_000)
