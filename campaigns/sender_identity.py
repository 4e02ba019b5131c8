"""Who a campaign's mail is from, and where its links are tracked.

First-party orgs send from their own verified domain, with click-tracking links on
a host of that domain (branded links); every other org sends from the shared domain
and its tracking host. The decision is made once per batch, from the first-party
snapshot, never per recipient.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from email.utils import formataddr
from urllib.parse import quote

from campaigns.addresses import parse_sender

_LINK = re.compile(r'href="(https?://[^"]+)"')


@dataclass(frozen=True)
class SendingDomains:
    """The platform's shared sending domain and click-tracking host."""

    shared_domain: str
    shared_tracking_host: str


@dataclass(frozen=True, slots=True)
class SenderIdentity:
    """The ``From`` of a batch and the host its tracked links point at."""

    from_address: str
    tracking_host: str
    first_party: bool


def sender_identity(
    spec_from: str,
    *,
    first_party: bool,
    verified_domain: str | None,
    domains: SendingDomains,
) -> SenderIdentity:
    """Keep the spec's display name and local part; choose the domain and tracking host.

    A first-party org without a verified domain sends like any other org.
    """
    name, address = parse_sender(spec_from)
    local = address.rsplit("@", 1)[0]
    if first_party and verified_domain:
        domain, tracking = verified_domain, f"click.{verified_domain}"
    else:
        domain, tracking = domains.shared_domain, domains.shared_tracking_host
    return SenderIdentity(formataddr((name, f"{local}@{domain}")), tracking, first_party)


def track_links(body: str, identity: SenderIdentity, campaign_id: str, recipient_id: int) -> str:
    """Point every absolute link of an HTML body at the identity's tracking host."""

    def rewrite(match: re.Match[str]) -> str:
        target = quote(html.unescape(match[1]), safe="")
        return (
            f'href="https://{identity.tracking_host}/c/{quote(campaign_id, safe="")}/'
            f'{recipient_id}?u={target}"'
        )

    return _LINK.sub(rewrite, body)
