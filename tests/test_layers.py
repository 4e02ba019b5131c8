"""The layers the folders show: SQL only in ``campaigns/store``, workflows free of I/O.

These tests read the code, not the database: they fail when a statement or a
connection call appears outside the store, when importing the workflows pulls in a
database or HTTP library, or when an activity's registered name drifts from the
name the workflows schedule it by.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from temporalio.activity import _Definition

from activities import MaintenanceActivities, PlanningActivities, SendingActivities
from campaigns import contract

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [ROOT / "worker.py", *(ROOT / name for name in ("activities", "campaigns", "workflows"))]
STORE = ROOT / "campaigns" / "store"

_SQL = re.compile(
    r"\b(SELECT\s|INSERT\s+INTO\b|UPDATE\s|DELETE\s+FROM\b|CREATE\s+(TEMP\s+)?TABLE\b)"
)
_CONNECTION_CALLS = {
    "fetch",
    "fetchrow",
    "fetchval",
    "execute",
    "executemany",
    "copy_records_to_table",
    "copy_to_table",
    "copy_from_query",
}


def _product_files() -> list[Path]:
    files: list[Path] = []
    for root in PRODUCT:
        files += [root] if root.is_file() else sorted(root.rglob("*.py"))
    return [path for path in files if STORE not in path.parents]


def _sql_outside_store(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line what`` for each SQL literal or connection call in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _SQL.search(node.value)
            if match:
                found.append(f"{where} SQL {match[0].strip()!r}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _CONNECTION_CALLS
        ):
            found.append(f"{where} .{node.func.attr}(...)")
    return found


def test_the_scan_finds_sql_and_connection_calls(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        'Q = f"""SELECT id\n FROM t"""\n'
        "async def f(conn):\n"
        "    await conn.execute('DELETE FROM t')\n"
        "    await conn.copy_records_to_table('t', records=[])\n"
    )
    found = _sql_outside_store(sample, tmp_path)
    assert len(found) == 4, found


def test_no_sql_outside_the_store() -> None:
    files = _product_files()
    assert len(files) > 20  # the scan does look at the product
    found = [hit for path in files for hit in _sql_outside_store(path)]
    assert found == [], "SQL belongs in campaigns/store:\n" + "\n".join(found)


def test_importing_the_workflows_loads_no_io_library() -> None:
    code = (
        "import workflows, sys; print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in {'asyncpg','httpx','aiohttp','httpcore'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_activities_register_under_the_names_the_workflows_schedule() -> None:
    registered = {
        _Definition.must_from_callable(method).name
        for method in (
            PlanningActivities.prepare_campaign,
            PlanningActivities.plan_batches,
            PlanningActivities.abandon_failed,
            SendingActivities.send_batch,
            MaintenanceActivities.refresh_first_party_orgs,
        )
    }
    # The names recorded in tests/histories: renaming one breaks replay.
    assert (
        registered
        == {
            contract.PREPARE_CAMPAIGN,
            contract.PLAN_BATCHES,
            contract.ABANDON_FAILED,
            contract.SEND_BATCH,
            contract.REFRESH_FIRST_PARTY_ORGS,
        }
        == {
            "prepare_campaign",
            "plan_batches",
            "abandon_failed",
            "send_batch",
            "refresh_first_party_orgs",
        }
    )
