"""The campaign workflow's pure arithmetic: pacing, rate, ETA and the Web UI details.

Carved out of the workflow so it can be unit-tested without a Temporal server; it
reads no clock of its own (callers pass ``workflow.time()``), so replays compute
exactly what the first run did.
"""

from __future__ import annotations

from collections import deque

from campaigns.models import CampaignState, CampaignStatus

RATE_WINDOW_SECONDS = 30.0
"""The status's rate is measured over this many seconds of finished batches."""
RATE_BURST_SECONDS = 1.0
"""Most lateness a rate-limited start may make up for at once."""


def paced_start(previous: float, now: float, size: int, rate_per_second: float) -> float:
    """When the batch after one of ``size`` recipients, started ``now``, may start.

    A timer that fires late gets credit for at most ``RATE_BURST_SECONDS`` of its
    lateness, so a few batches may start at once and the average rate holds.
    """
    return max(previous, now - RATE_BURST_SECONDS) + size / rate_per_second


class RateWindow:
    """Recipients processed per second over the last ``RATE_WINDOW_SECONDS``."""

    def __init__(self) -> None:
        """Start with no sample."""
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, processed: int) -> float:
        """Record ``processed`` (a running total) at ``now``; return the current rate."""
        samples = self._samples
        samples.append((now, processed))
        while len(samples) > 2 and now - samples[0][0] > RATE_WINDOW_SECONDS:
            samples.popleft()
        first_time, first_count = samples[0]
        elapsed = now - first_time
        return (processed - first_count) / elapsed if elapsed else 0


def eta_seconds(status: CampaignStatus) -> float | None:
    """Seconds until every recipient has an outcome at the current rate, if known."""
    remaining = max(0, status.total - status.counts.processed - status.counts.failed)
    return remaining / status.rate_per_second if status.rate_per_second else None


def _paused_text(status: CampaignStatus) -> str:
    reason = status.controls.pause_reason if status.controls is not None else None
    if reason:
        return f"paused by the reputation watch: {reason}; no batch starts until it is resumed"
    return "paused: no batch starts until it is resumed"


def details_text(status: CampaignStatus, percent: int) -> str:
    """The Markdown the Web UI shows as the workflow's current details."""

    def per_second(value: float) -> str:
        return f"{value:,.2f}".rstrip("0").rstrip(".")

    counts, controls = status.counts, status.controls
    lines = [
        f"**{status.state.value}** · {percent}% of {status.total:,} · round {status.round}",
        f"sent {counts.sent:,} · failed {counts.failed:,} · rejected {counts.rejected:,} · "
        f"suppressed {counts.suppressed:,} · skipped {counts.skipped:,} · "
        f"abandoned {counts.abandoned:,}",
        _paused_text(status)
        if status.state is CampaignState.PAUSED
        else f"{status.rate_per_second:,.0f} emails/s over the last {RATE_WINDOW_SECONDS:.0f}s"
        + (f" · ETA {status.eta_seconds:,.0f}s" if status.eta_seconds else ""),
    ]
    if controls is not None:
        limit = f"{controls.rate_per_second:,.0f}/s" if controls.rate_per_second else "none"
        line = f"priority {controls.priority} · window {controls.window} · rate limit {limit}"
        if status.org_rate_cap is not None:
            line += f" · org-cap share {per_second(status.org_rate_cap)}/s"
        if status.account_rate is not None:
            line += f" · account {per_second(status.account_rate)} requests/s"
        lines.append(line)
    if status.last_error:
        lines.append(f"last error: {status.last_error}")
    return "\n\n".join(lines)
