"""The delivery ledger and the provider-request plans: the send path's statements.

Every read starts from the campaign's row and requires its org and audience, so no
activity input can reach another org's recipients, suppressions or ledger rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from campaigns.store._pool import Conn

Source = Literal["audience", "ledger"]
"""Where a pass reads its recipients: the whole audience, or the ledger's failures."""

# Only the campaign's own audience, and only when the campaign belongs to the org the
# workflow names ($5): no input can page another org's recipients. The request of a
# recipient an earlier execution left failed or abandoned, which a range must not
# split, is an index-only probe of deliveries_to_retry.
_PAGE_AUDIENCE = """
SELECT r.id, d.request_last_id FROM campaigns c
JOIN recipients r ON r.audience_id = c.audience_id
LEFT JOIN deliveries d ON d.campaign_id = c.id AND d.recipient_id = r.id
                      AND d.status IN ('failed', 'abandoned')
WHERE c.id = $4 AND c.audience_id = $1 AND ($5::text IS NULL OR c.org_id = $5)
  AND r.id > $2
ORDER BY r.id LIMIT $3
"""
_PAGE_LEDGER = """
SELECT d.recipient_id AS id, d.request_last_id FROM deliveries d
WHERE d.campaign_id = $1 AND d.status IN ('failed', 'abandoned') AND d.recipient_id > $2
  AND EXISTS (SELECT 1 FROM campaigns c
              WHERE c.id = $1 AND ($4::text IS NULL OR c.org_id = $4))
ORDER BY d.recipient_id LIMIT $3
"""

# merge_fields as text, decoded by orjson in read_range: the send path's biggest
# decode, and exact here (the import writes an object of strings only).
_COLUMNS = """
    r.id, r.email, r.name, r.merge_fields::text,
    d.status::text AS status, d.execution_id, d.round, d.request_key,
    s.email IS NOT NULL AS suppressed
"""
# Both reads start from the campaign's row and require its org ($2) and audience ($3):
# no batch input can read another org's recipients, suppressions or ledger rows.
# The ledger join repeats the range: for a campaign the planner's statistics do not
# know yet it expects no ledger rows and would otherwise read all the campaign has
# sent, for every batch.
_READ_AUDIENCE_RANGE = f"""
SELECT {_COLUMNS}
FROM campaigns c
JOIN recipients r ON r.audience_id = c.audience_id
LEFT JOIN deliveries d ON d.campaign_id = c.id AND d.recipient_id = r.id
                      AND d.recipient_id > $4 AND d.recipient_id <= $5
LEFT JOIN suppressions s ON s.org_id = c.org_id AND s.email = r.email
WHERE c.id = $1 AND c.org_id = $2 AND c.audience_id = $3 AND r.id > $4 AND r.id <= $5
ORDER BY r.id
"""
_READ_LEDGER_RANGE = f"""
SELECT {_COLUMNS}
FROM campaigns c
JOIN deliveries d ON d.campaign_id = c.id
JOIN recipients r ON r.id = d.recipient_id AND r.audience_id = c.audience_id
LEFT JOIN suppressions s ON s.org_id = c.org_id AND s.email = r.email
WHERE c.id = $1 AND c.org_id = $2 AND c.audience_id = $3
  AND d.recipient_id > $4 AND d.recipient_id <= $5
  AND (d.status IN ('failed', 'abandoned') OR (d.execution_id = $6 AND d.round = $7))
ORDER BY d.recipient_id
"""
_PLAN_COLUMNS = (
    "campaign_id",
    "execution_id",
    "round",
    "batch_last_id",
    "request_key",
    "recipient_ids",
)
_READ_PLAN = """
SELECT request_key, recipient_ids FROM provider_requests
WHERE campaign_id = $1 AND execution_id = $2 AND round = $3 AND batch_last_id = $4
ORDER BY id
"""
# One round trip for the whole batch: outcomes in and, once every request of the batch
# has an answer ($10), its plan out. A row already 'sent' is never overwritten.
_RECORD = """
WITH planned AS (
    DELETE FROM provider_requests
    WHERE campaign_id = $1 AND execution_id = $2 AND round = $3 AND batch_last_id = $4
      AND $10
)
INSERT INTO deliveries AS d (campaign_id, recipient_id, status, execution_id, round,
                             provider_message_id, request_key, request_last_id, last_error,
                             sent_at)
SELECT $1, o.recipient_id, o.status::delivery_status, $2, $3, o.message_id, o.request_key,
       o.request_last_id, o.error, CASE WHEN o.status = 'sent' THEN now() END
FROM unnest($5::bigint[], $6::text[], $7::text[], $8::text[], $11::bigint[], $9::text[])
     AS o(recipient_id, status, message_id, request_key, request_last_id, error)
ON CONFLICT (campaign_id, recipient_id) DO UPDATE SET
    status = EXCLUDED.status,
    execution_id = EXCLUDED.execution_id,
    round = EXCLUDED.round,
    attempts = d.attempts + 1,
    provider_message_id = EXCLUDED.provider_message_id,
    request_key = EXCLUDED.request_key,
    request_last_id = EXCLUDED.request_last_id,
    last_error = EXCLUDED.last_error,
    last_attempt_at = now(),
    sent_at = EXCLUDED.sent_at
WHERE d.status <> 'sent'
"""
_ABANDON_FAILED = """UPDATE deliveries d SET status = 'abandoned', last_attempt_at = now()
               FROM campaigns c
               WHERE c.id = d.campaign_id AND d.campaign_id = $1 AND d.status = 'failed'
                 AND ($2::text IS NULL OR c.org_id = $2)"""
_COUNT_TO_RETRY = """SELECT count(*) FROM deliveries
               WHERE campaign_id = $1 AND status IN ('failed', 'abandoned')"""
# Plans left by batches that never recorded (a terminated workflow) are of no use
# once the provider has forgotten their keys.
_PURGE_STALE_PLANS = "DELETE FROM provider_requests WHERE planned_at < now() - interval '24 hours'"


PageRow = tuple[int, int | None]
"""One recipient id of a page, and the last recipient id of the failed request that
carried it (None when no earlier request failed with it). A plain pair: a page holds up
to 100,000, and an object each cost the planner more than its SQL."""


@dataclass(frozen=True, slots=True)
class RecipientRow:
    """A recipient of a batch range, with its ledger row and suppression status."""

    id: int
    email: str
    name: str
    merge_fields: dict[str, Any]
    status: str | None
    execution_id: str | None
    round: int | None
    request_key: str | None
    suppressed: bool


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """A provider request written ahead of sending, with the recipients it carries."""

    request_key: str
    recipient_ids: list[int]


@dataclass(frozen=True, slots=True)
class PlanScope:
    """The batch a plan belongs to: campaign, execution, round and range end."""

    campaign_id: str
    execution_id: str
    round: int
    batch_last_id: int


@dataclass
class Outcomes:
    """Outcomes of one batch attempt, in the ledger's column layout (one list each)."""

    ids: list[int] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    message_ids: list[str | None] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    request_last_ids: list[int | None] = field(default_factory=list)


async def page(
    conn: Conn,
    *,
    source: Source,
    campaign_id: str,
    org: str | None,
    audience_id: int,
    after_id: int,
    limit: int,
) -> list[PageRow]:
    """Up to ``limit`` recipient ids after ``after_id``, in id order (keyset paging).

    ``source`` "audience" reads the campaign's audience, "ledger" its failed and
    abandoned recipients. ``org`` None (a run of an older version) skips the org
    check; the audience must be the campaign's either way.
    """
    if source == "audience":
        rows = await conn.fetch(_PAGE_AUDIENCE, audience_id, after_id, limit, campaign_id, org)
    else:
        rows = await conn.fetch(_PAGE_LEDGER, campaign_id, after_id, limit, org)
    return [(row[0], row[1]) for row in rows]


async def read_range(
    conn: Conn,
    *,
    source: Source,
    campaign_id: str,
    org: str,
    audience_id: int,
    after_id: int,
    last_id: int,
    execution_id: str,
    round: int,
) -> list[RecipientRow]:
    """The recipients of the range ``(after_id, last_id]``, with ledger and suppression.

    From the ledger, only recipients failed or abandoned, or decided by this
    execution's ``round`` (an earlier attempt of the same batch).
    """
    args: tuple[object, ...] = (campaign_id, org, audience_id, after_id, last_id)
    if source == "audience":
        rows = await conn.fetch(_READ_AUDIENCE_RANGE, *args)
    else:
        rows = await conn.fetch(_READ_LEDGER_RANGE, *args, execution_id, round)
    loads = orjson.loads
    return [
        RecipientRow(row[0], row[1], row[2], loads(row[3]), row[4], row[5], row[6], row[7], row[8])
        for row in rows
    ]


def _scope_args(scope: PlanScope) -> tuple[str, str, int, int]:
    return scope.campaign_id, scope.execution_id, scope.round, scope.batch_last_id


async def read_plan(conn: Conn, scope: PlanScope) -> list[PlannedRequest]:
    """The requests planned for the batch, in the order they were planned."""
    rows = await conn.fetch(_READ_PLAN, *_scope_args(scope))
    return [PlannedRequest(row["request_key"], row["recipient_ids"]) for row in rows]


async def write_plan(
    conn: Conn,
    scope: PlanScope,
    requests: Sequence[tuple[str, list[int]]],
) -> None:
    """Write ahead the ``(request key, recipient ids)`` about to be sent (COPY)."""
    if requests:
        args = _scope_args(scope)
        await conn.copy_records_to_table(
            "provider_requests",
            columns=_PLAN_COLUMNS,
            records=[(*args, key, recipient_ids) for key, recipient_ids in requests],
        )


async def record(conn: Conn, scope: PlanScope, outcomes: Outcomes, *, clear_plan: bool) -> None:
    """Write the batch's outcomes in one statement; with ``clear_plan``, drop its plan.

    A ledger row already ``sent`` is never overwritten.
    """
    await conn.execute(
        _RECORD,
        *_scope_args(scope),
        outcomes.ids,
        outcomes.statuses,
        outcomes.message_ids,
        outcomes.keys,
        outcomes.errors,
        clear_plan,
        outcomes.request_last_ids,
    )


async def abandon_failed(conn: Conn, campaign_id: str, org: str | None) -> int:
    """Mark the campaign's failed recipients abandoned; return how many.

    ``org`` None (a run of an older version) skips the org check.
    """
    result = await conn.execute(_ABANDON_FAILED, campaign_id, org)
    return int(result.split()[-1])


async def count_to_retry(conn: Conn, campaign_id: str) -> int:
    """How many recipients of the campaign are failed or abandoned."""
    return int(await conn.fetchval(_COUNT_TO_RETRY, campaign_id))


async def purge_stale_plans(conn: Conn) -> None:
    """Drop plans older than a day: the provider no longer knows their keys."""
    await conn.execute(_PURGE_STALE_PLANS)
