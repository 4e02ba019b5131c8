"""Demo data: a generated audience and a campaign spec that uses its merge fields.

The audience is personal data in form if not in substance, so it is written like any
other file of the data directory: the directory 0700, the file 0600.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from campaigns.models import CampaignSpec
from campaigns.stack import private_dir

DEMO_ORG = "demo"
_FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tim"]
_CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Tartu", "Dakar", "Quito"]
_PLANS = ["free", "team", "business"]


def write_demo_audience(directory: Path, recipients: int) -> Path:
    """Write (once) a CSV of ``recipients`` rows with name, city and plan columns (0600)."""
    private_dir(directory)
    path = directory / f"audience-{recipients}.csv"
    if path.is_file():
        path.chmod(0o600)  # written by an older version, perhaps world-readable
        return path
    partial = path.with_suffix(".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # a partial file left by an interrupted run keeps its mode otherwise
    with os.fdopen(fd, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "name", "city", "plan"])
        for n in range(1, recipients + 1):
            writer.writerow(
                [
                    _address(n),
                    f"{_FIRST[n % len(_FIRST)]} <{n}>",  # '<' shows that html escapes values
                    _CITIES[n % len(_CITIES)],
                    _PLANS[n % len(_PLANS)],
                ]
            )
    partial.rename(path)
    return path


def _address(n: int) -> str:
    return f"reader{n:07d}@example.com"


def demo_suppressions(recipients: int) -> list[str]:
    """Every 400th demo reader has unsubscribed."""
    return [_address(n) for n in range(400, recipients + 1, 400)]


def demo_provider_behaviour(recipients: int) -> dict[str, object]:
    """What the simulator's webhooks report for the demo: a few hard bounces, soft
    bounces and complaints, a third of readers opening, some duplicates and some
    events out of order (simulator config fields)."""

    def readers(first: int, step: int, most: int) -> list[str]:
        return [_address(n) for n in range(first, recipients + 1, step)][:most]

    return {
        "hard_bounce_addresses": readers(137, 997, 5),
        "soft_bounce_addresses": readers(211, 1999, 2),
        "complaint_addresses": readers(555, 1499, 3),
        "open_rate": 0.3,
        "click_rate": 0.05,
        "duplicate_rate": 0.02,
        "out_of_order_rate": 0.05,
        "seed": 1,
    }


def demo_spec(recipients: int, campaign_id: str) -> CampaignSpec:
    """A campaign to the demo audience of ``recipients`` rows."""
    return CampaignSpec(
        campaign_id=campaign_id,
        org=DEMO_ORG,
        audience=f"demo-{recipients}",
        from_address="Demo Team <news@demo.example.com>",
        subject="{{ name }}, what's new in {{ city }}",
        html="<p>Hello {{ name }},</p><p>Your {{ plan }} plan now includes campaigns.</p>",
        text="Hello {{ name }},\n\nYour {{ plan }} plan now includes campaigns.",
        tags={"source": "demo"},
        window=8,
        recipients_per_activity=500,
    )
