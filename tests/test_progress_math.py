"""The workflow's pure arithmetic: pacing, rate over a window, ETA, Web UI details."""

from __future__ import annotations

from campaigns.models import CampaignControls, CampaignCounts, CampaignState, CampaignStatus
from workflows._progress import (
    RATE_WINDOW_SECONDS,
    RateWindow,
    details_text,
    eta_seconds,
    paced_start,
)


def status(**fields: object) -> CampaignStatus:
    values: dict = {"campaign_id": "c", "org": "o", "state": CampaignState.RUNNING}
    values.update(fields)
    return CampaignStatus(**values)


def test_pacing_spaces_batches_by_size_over_rate_and_credits_one_second_of_lateness() -> None:
    assert paced_start(100.0, 100.0, 500, 100.0) == 105.0
    # A timer that fired 3 s late makes up for one second only.
    assert paced_start(100.0, 103.0, 500, 100.0) == 107.0
    # Early (the previous start is still ahead): spacing keeps from it.
    assert paced_start(110.0, 100.0, 100, 100.0) == 111.0


def test_the_rate_is_measured_over_the_last_window_only() -> None:
    window = RateWindow()
    assert window.add(0.0, 0) == 0
    assert window.add(10.0, 1000) == 100.0
    assert window.add(20.0, 2000) == 100.0
    # Old samples fall out: the rate follows the recent pace.
    assert window.add(RATE_WINDOW_SECONDS + 20.0, 2200) == (2200 - 2000) / 30.0
    assert window.add(RATE_WINDOW_SECONDS + 60.0, 2400) < 100.0


def test_eta_counts_what_has_no_outcome_yet() -> None:
    counts = CampaignCounts(sent=600, failed=100, suppressed=100)
    assert eta_seconds(status(total=1000, counts=counts, rate_per_second=50.0)) == 4.0
    assert eta_seconds(status(total=1000, counts=counts, rate_per_second=0.0)) is None


def test_details_say_paused_without_a_rate_and_name_the_limits() -> None:
    controls = CampaignControls(window=8, rate_per_second=250.0, paused=True)
    paused = details_text(
        status(state=CampaignState.PAUSED, total=10, rate_per_second=99.0, controls=controls), 40
    )
    assert "**Paused** · 40% of 10" in paused
    assert "paused: no batch starts until it is resumed" in paused
    assert "emails/s" not in paused and "ETA" not in paused
    assert "priority 3 · window 8 · rate limit 250/s" in paused
    assert "org-cap share" not in paused and "account" not in paused
    running = details_text(
        status(total=10, rate_per_second=12.0, eta_seconds=30.0, last_error="HTTP 500"), 5
    )
    assert "12 emails/s over the last 30s · ETA 30s" in running
    assert running.endswith("last error: HTTP 500")


def test_details_name_the_priority_the_org_cap_share_and_the_account_rate() -> None:
    controls = CampaignControls(window=4, priority=1)
    text = details_text(
        status(total=10, controls=controls, org_rate_cap=12.5, account_rate=40.0), 50
    )
    assert "priority 1 · window 4 · rate limit none · org-cap share 12.5/s · account 40 " in text
    assert "requests/s" in text
    only_account = details_text(status(controls=controls, account_rate=0.333), 0)
    assert only_account.endswith(
        "priority 1 · window 4 · rate limit none · account 0.33 requests/s"
    )
