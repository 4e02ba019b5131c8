"""The reputation watch's decision: pause a campaign whose recipients complain or bounce.

Pure, so it can be tested without a server and replays exactly: the workflow reads
the campaign's engagement counters (``read_engagement``) and passes them here with
the spec's ``ReputationLimits``. The reason it returns holds counts and rates only,
never an address: it goes to the status, the Web UI and workflow history.
"""

from __future__ import annotations

from campaigns.models import ReputationCounts, ReputationLimits


def percent(fraction: float) -> str:
    """``fraction`` as a percentage with two decimals, more digits if it would read 0.00%."""
    text = f"{fraction:.2%}"
    if fraction > 0 and text == "0.00%":
        text = f"{fraction * 100:.2g}%"
    return text


def verdict(
    limits: ReputationLimits,
    counts: ReputationCounts,
    baseline: ReputationCounts | None = None,
) -> str | None:
    """Why the campaign must pause, or None while its rates are within ``limits``.

    ``counts`` are the campaign's totals so far; ``baseline`` is subtracted first: the
    totals when an operator resumed a reputation pause, so the counts that caused that
    pause do not cause another at once. Only what arrived since is judged, and only
    once at least ``limits.min_delivered`` emails were delivered since. A rate equal to
    its limit pauses.
    """
    judged = counts.since(baseline)
    delivered = judged.delivered
    if delivered < limits.min_delivered:
        return None
    since = " since the last resume" if baseline is not None else ""
    reasons = []
    for name, part, limit in (
        ("complaint rate", judged.complained, limits.max_complaint_rate),
        ("hard-bounce rate", judged.hard_bounced, limits.max_hard_bounce_rate),
    ):
        # Division is correctly rounded: a ratio that equals the limit's decimal value
        # compares equal to the limit's float, so "at exactly the threshold" holds.
        rate = part / delivered
        if rate >= limit:
            reasons.append(
                f"{name} {percent(rate)} >= {percent(limit)} "
                f"({part:,} of {delivered:,} delivered{since})"
            )
    return "; ".join(reasons) or None
