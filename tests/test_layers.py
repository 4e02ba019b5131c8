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

from activities import (
    MaintenanceActivities,
    PlanningActivities,
    ReputationActivities,
    SendingActivities,
)
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
            PlanningActivities.plan_sends,
            PlanningActivities.abandon_failed,
            SendingActivities.send_batch,
            ReputationActivities.read_engagement,
            MaintenanceActivities.refresh_first_party_orgs,
        )
    }
    # The names recorded in tests/histories: renaming one breaks replay.
    assert (
        registered
        == {
            contract.PREPARE_CAMPAIGN,
            contract.PLAN_BATCHES,
            contract.PLAN_SENDS,
            contract.ABANDON_FAILED,
            contract.SEND_BATCH,
            contract.READ_ENGAGEMENT,
            contract.REFRESH_FIRST_PARTY_ORGS,
        }
        == {
            "prepare_campaign",
            "plan_batches",
            "plan_sends",
            "abandon_failed",
            "send_batch",
            "read_engagement",
            "refresh_first_party_orgs",
        }
    )


# Which product modules each room may import (prefixes; a room may always import
# itself). ARCHITECTURE.md draws the same picture.
_PURE = (
    "campaigns.models",
    "campaigns.addresses",
    "campaigns.safe_text",
    "campaigns.templates",
    "campaigns.rate_control",
)
_ALLOWED: dict[str, tuple[str, ...]] = {
    "workflows": ("campaigns.models", "campaigns.contract", "campaigns.search_attributes"),
    "campaigns.store": _PURE,
    "campaigns.provider": ("campaigns.safe_text",),
}
_DOMAIN = (
    "campaigns.models",
    "campaigns.contract",
    "campaigns.spec_check",
    "campaigns.templates",
    "campaigns.addresses",
    "campaigns.safe_text",
    "campaigns.sender_identity",
    "campaigns.first_party",
    "campaigns.audience_import",
    "campaigns.search_attributes",
    "campaigns.rate_control",
)
_ABOVE_DOMAIN = ("activities", "workflows", "worker", "campaigns.cli", "campaigns.client",
                 "campaigns.stack", "campaigns.demo", "campaigns.schedules", "campaigns.settings",
                 "campaigns.temporal")  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _product_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    roots = ("campaigns", "activities", "workflows", "worker")
    return {name for name in names if name.split(".")[0] in roots}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_each_room_imports_only_what_it_may() -> None:
    files = [*_product_files(), *sorted(STORE.rglob("*.py"))]
    wrong = []
    for path in files:
        module = _module_name(path)
        imports = _product_imports(path)
        for room, allowed in _ALLOWED.items():
            if _within(module, (room,)):
                # ``from campaigns import x`` names the package itself: judge ``x``.
                bad = {
                    name
                    for name in imports
                    if name != "campaigns" and not _within(name, (room, *allowed))
                }
                wrong += [f"{module} imports {name}" for name in sorted(bad)]
        if _within(module, _DOMAIN):
            bad = {name for name in imports if _within(name, _ABOVE_DOMAIN)}
            wrong += [f"{module} (domain) imports {name}" for name in sorted(bad)]
    assert wrong == []
