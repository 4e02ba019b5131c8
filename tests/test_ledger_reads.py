"""The batch read touches only its own range of the ledger, whatever the planner knows.

A campaign that has just started is unknown to PostgreSQL's statistics: the planner
expects it to have no ledger rows. The read of a batch must then still look only at
the ledger rows of that batch's range, not at everything the campaign has sent so
far (which made every batch of a new campaign slower as it went on).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg

from campaigns.store import campaigns as campaign_store
from campaigns.store import ledger
from tests.helpers import addresses, make_audience, make_org, unique

AUDIENCE_SIZE = 3_000
BATCH = 100


def _ledger_rows_read(plan: dict[str, Any]) -> int:
    """Rows every scan of ``deliveries`` in an EXPLAIN ANALYZE plan produced or removed."""
    read = 0
    if plan.get("Relation Name") == "deliveries":
        per_loop = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
        read += per_loop * plan["Actual Loops"]
    for child in plan.get("Plans", []):
        read += _ledger_rows_read(child)
    return read


async def _campaign(pool: asyncpg.Pool, tmp_path: Path, org: str) -> tuple[str, int]:
    audience, _ = await make_audience(pool, tmp_path, org, addresses(unique("r"), AUDIENCE_SIZE))
    audience_id = await pool.fetchval(
        "SELECT id FROM audiences WHERE org_id = $1 AND name = $2", org, audience
    )
    campaign_id = unique("camp")
    async with pool.acquire() as conn:
        assert await campaign_store.save(
            conn,
            campaign_id=campaign_id,
            org=org,
            audience_id=audience_id,
            spec={},
            workflow_id=None,
        )
    return campaign_id, audience_id


async def _send_all_but_last_batch(
    pool: asyncpg.Pool, campaign_id: str, audience_id: int
) -> list[int]:
    """Ledger rows 'sent' for the audience but its last BATCH; returns the audience's ids."""
    ids = await pool.fetchval(
        "SELECT array_agg(id ORDER BY id) FROM recipients WHERE audience_id = $1", audience_id
    )
    await pool.execute(
        "INSERT INTO deliveries (campaign_id, recipient_id, status, execution_id, round)"
        " SELECT $1, id, 'sent', 'exec-1', 0 FROM unnest($2::bigint[]) AS id",
        campaign_id,
        ids[:-BATCH],
    )
    return [int(i) for i in ids]


async def test_a_new_campaigns_batch_reads_only_its_range_of_the_ledger(
    own_db: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(own_db)
    known, known_audience = await _campaign(own_db, tmp_path, org)
    await _send_all_but_last_batch(own_db, known, known_audience)
    fresh, fresh_audience = await _campaign(own_db, tmp_path, org)
    # Statistics taken before the fresh campaign sent anything: to the planner it has
    # no ledger rows, as for any campaign started since the last ANALYZE.
    await own_db.execute("ANALYZE deliveries")
    ids = await _send_all_but_last_batch(own_db, fresh, fresh_audience)
    after_id, last_id = ids[-BATCH - 1], ids[-1]

    args = (fresh, org, fresh_audience, after_id, last_id)
    explained = await own_db.fetchval(
        "EXPLAIN (ANALYZE, FORMAT JSON) " + ledger._READ_AUDIENCE_RANGE, *args
    )
    # The pool decodes json itself; a plain connection would hand back text.
    plan = (json.loads(explained) if isinstance(explained, str) else explained)[0]["Plan"]
    assert _ledger_rows_read(plan) <= BATCH, json.dumps(plan, indent=1)

    async def read(after: int, last: int) -> list[ledger.RecipientRow]:
        async with own_db.acquire() as conn:
            return await ledger.read_range(
                conn,
                source="audience",
                campaign_id=fresh,
                org=org,
                audience_id=fresh_audience,
                after_id=after,
                last_id=last,
                execution_id="exec-2",
                round=0,
            )

    rows = await read(after_id, last_id)
    before = await read(ids[-2 * BATCH - 1], after_id)
    assert [row.id for row in rows] == ids[-BATCH:]
    assert all(row.status is None for row in rows)
    assert len(before) == BATCH and all(row.status == "sent" for row in before)
