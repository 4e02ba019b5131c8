"""The first-party snapshot: the one-statement refresh and the snapshot reads."""

from __future__ import annotations

from dataclasses import dataclass

from campaigns.store._pool import Conn

# One statement: validate, compute, publish, swap, diff, clean up. Nothing is written
# when a flag has an unknown state or there are no orgs at all.
#
# * ``states`` is a loose index scan: one probe of org_feature_flags_by_flag per
#   distinct state, so validation does not read every org's flag.
# * ``computed`` is an index-only scan of the 'on' range of org_feature_flags_by_flag
#   merged with an index-only scan of org_tokens_by_org, already in org_id order.
# * The pointer moves only from the snapshot this statement read as ``previous``
#   (compare-and-swap). A concurrent refresh that swapped first wins and this one
#   reports ``published = false``, so the pointer never moves back to a lower version
#   and added/removed are always against the snapshot actually replaced.
# * The diff is one hash full join, and is skipped when the set did not change.
_REFRESH = """
WITH RECURSIVE states AS (
    SELECT min(state) AS state FROM org_feature_flags WHERE flag = $1
    UNION ALL
    SELECT (SELECT min(f.state) FROM org_feature_flags f WHERE f.flag = $1 AND f.state > s.state)
    FROM states s WHERE s.state IS NOT NULL
), unknown AS (
    SELECT u.org_id, s.state
    FROM states s CROSS JOIN LATERAL (
        SELECT f.org_id FROM org_feature_flags f
        WHERE f.flag = $1 AND f.state = s.state ORDER BY f.org_id LIMIT 20
    ) u
    WHERE s.state <> ALL($2::text[])
    ORDER BY u.org_id LIMIT 20
), any_org AS (
    SELECT EXISTS (SELECT 1 FROM orgs) AS present
), publish AS (
    SELECT NOT EXISTS (SELECT 1 FROM unknown) AND (SELECT present FROM any_org) AS ok
), computed AS MATERIALIZED (  -- once, though both org_ids and size read it
    SELECT ARRAY(
        SELECT f.org_id FROM org_feature_flags f
        WHERE f.flag = $1 AND f.state = 'on'
          AND EXISTS (SELECT 1 FROM org_tokens t WHERE t.org_id = f.org_id)
        ORDER BY f.org_id
    ) AS org_ids
), previous AS (
    SELECT s.version, s.org_ids FROM first_party_current c
    JOIN first_party_snapshots s ON s.version = c.version
), snapshot AS (
    INSERT INTO first_party_snapshots (version, org_ids, size)
    SELECT nextval('first_party_snapshot_version'), c.org_ids, cardinality(c.org_ids)
    FROM computed c
    WHERE (SELECT ok FROM publish)
    RETURNING version, org_ids, size, refreshed_at
), pointer AS (
    INSERT INTO first_party_current (singleton, version, refreshed_at)
    SELECT true, version, refreshed_at FROM snapshot
    ON CONFLICT (singleton) DO UPDATE
    SET version = EXCLUDED.version, refreshed_at = EXCLUDED.refreshed_at
    WHERE first_party_current.version = (SELECT version FROM previous)
    RETURNING version
), cleanup AS (
    DELETE FROM first_party_snapshots
    WHERE version < (SELECT version FROM previous) AND EXISTS (SELECT 1 FROM pointer)
), diff AS (
    SELECT n.org_id AS added, o.org_id AS removed
    FROM unnest((SELECT org_ids FROM snapshot)) AS n (org_id)
    FULL JOIN unnest((SELECT org_ids FROM previous)) AS o (org_id) ON o.org_id = n.org_id
    WHERE (n.org_id IS NULL OR o.org_id IS NULL)
      AND (SELECT org_ids FROM snapshot) <> coalesce((SELECT org_ids FROM previous), '{}')
)
SELECT
    (SELECT version FROM snapshot) AS version,
    (SELECT size FROM snapshot) AS size,
    (SELECT version FROM previous) AS previous_version,
    EXISTS (SELECT 1 FROM pointer) AS published,
    (SELECT count(added) FROM diff) AS added_count,
    ARRAY(SELECT added FROM diff WHERE added IS NOT NULL ORDER BY 1 LIMIT $3) AS added,
    (SELECT count(removed) FROM diff) AS removed_count,
    ARRAY(SELECT removed FROM diff WHERE removed IS NOT NULL ORDER BY 1 LIMIT $3) AS removed,
    ARRAY(SELECT org_id || '=' || state FROM unknown) AS unknown,
    (SELECT present FROM any_org) AS any_org
"""

_CURRENT = """
SELECT s.version, s.org_ids, s.refreshed_at
FROM first_party_current c JOIN first_party_snapshots s ON s.version = c.version
"""
_VERSION = "SELECT version FROM first_party_current"


@dataclass(frozen=True, slots=True)
class RefreshRow:
    """What the refresh statement did.

    ``unknown`` lists ``org=state`` for flags in a state not in ``known_states``
    and ``any_org`` is false for an empty ``orgs`` table: either way nothing was
    written and the other fields are None or empty.
    """

    version: int | None
    size: int | None
    previous_version: int | None
    published: bool
    added_count: int
    added: list[str]
    removed_count: int
    removed: list[str]
    unknown: list[str]
    any_org: bool


@dataclass
class Snapshot:
    """One published first-party set."""

    version: int
    org_ids: frozenset[str]


async def refresh(conn: Conn, flag: str, known_states: list[str], sample: int) -> RefreshRow:
    """Compute the set of orgs with a token and ``flag`` on, publish it, swap the pointer.

    ``added`` and ``removed`` list at most ``sample`` org ids each.
    """
    row = await conn.fetchrow(_REFRESH, flag, known_states, sample)
    assert row is not None  # one row, always
    return RefreshRow(
        version=row["version"],
        size=row["size"],
        previous_version=row["previous_version"],
        published=row["published"],
        added_count=row["added_count"],
        added=row["added"] or [],
        removed_count=row["removed_count"],
        removed=row["removed"] or [],
        unknown=row["unknown"] or [],
        any_org=row["any_org"],
    )


async def current_version(conn: Conn) -> int | None:
    """The version of the current snapshot (one primary-key read), or None."""
    version: int | None = await conn.fetchval(_VERSION)
    return version


async def read_current(conn: Conn) -> Snapshot | None:
    """The current snapshot, read in one statement."""
    row = await conn.fetchrow(_CURRENT)
    return Snapshot(row["version"], frozenset(row["org_ids"])) if row else None
