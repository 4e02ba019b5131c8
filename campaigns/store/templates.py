"""Campaign templates stored by digest, scoped to their org."""

from __future__ import annotations

from campaigns.models import CampaignTemplates
from campaigns.store._pool import Conn


async def store_templates(conn: Conn, org: str, templates: CampaignTemplates) -> str:
    """Store ``templates`` for ``org`` (once per content) and return their digest."""
    digest = templates.digest()
    await conn.execute(
        """INSERT INTO campaign_templates (org_id, digest, subject, html, text)
           VALUES ($1, $2, $3, $4, $5) ON CONFLICT (org_id, digest) DO NOTHING""",
        org,
        digest,
        templates.subject,
        templates.html,
        templates.text,
    )
    return digest


async def load_templates(conn: Conn, org: str, digest: str) -> CampaignTemplates | None:
    """The templates ``org`` stored under ``digest``, or None.

    A row whose content no longer matches its digest is treated as missing, so a
    reference always means exactly the text that was validated.
    """
    row = await conn.fetchrow(
        "SELECT subject, html, text FROM campaign_templates WHERE org_id = $1 AND digest = $2",
        org,
        digest,
    )
    if row is None:
        return None
    templates = CampaignTemplates(subject=row["subject"], html=row["html"], text=row["text"])
    return templates if templates.digest() == digest else None
