"""docker-compose.yml's Temporal one-shots, their scripts run as their containers would
against stand-ins for ``temporal-sql-tool`` and the ``temporal`` CLI:

* temporal-schema creates both of Temporal's databases and schemas on the first start,
  only updates them on later starts, and stops on any other error;
* temporal-setup waits for the server, creates the ``default`` namespace once, registers
  every search attribute once, and stops on anything else.

With no Docker engine here, this and test_compose.py are what checks the file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from campaigns import search_attributes
from campaigns.binaries import temporal_cli
from tests.test_compose import argv_of, dependencies, environment, load_compose, services


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def _image_version(service: dict[str, Any]) -> str:
    return str(service["image"]).rpartition(":")[2]


def test_the_server_is_the_version_the_local_stack_runs(compose: dict[str, Any]) -> None:
    # The send limit, priorities and fairness were measured on the dev server of the
    # pinned temporal CLI: docker-compose runs the same server release.
    printed = subprocess.run(
        [temporal_cli(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Server (\d+\.\d+\.\d+)", printed)
    assert match, printed
    temporal = services(compose)["temporal"]
    assert temporal["image"] == f"temporalio/server:{match.group(1)}"
    for name in ("temporal-schema", "temporal-setup"):
        assert services(compose)[name]["image"] == f"temporalio/admin-tools:{match.group(1)}"


def test_the_one_shots_run_in_order(compose: dict[str, Any]) -> None:
    by_name = services(compose)
    assert dependencies(by_name["temporal-schema"]) == {"temporal-db": "service_healthy"}
    schema_done = {"temporal-schema": "service_completed_successfully"}
    assert dependencies(by_name["temporal"]) == schema_done
    assert dependencies(by_name["temporal-setup"]) == {"temporal": "service_healthy"}
    assert dependencies(by_name["worker"])["temporal-setup"] == "service_completed_successfully"
    for name in ("temporal-schema", "temporal-setup"):
        assert by_name[name]["restart"] == "no"


def test_temporal_setup_registers_every_search_attribute(compose: dict[str, Any]) -> None:
    setup = services(compose)["temporal-setup"]
    script = "\n".join(argv_of(setup["entrypoint"]) + argv_of(setup["command"]))
    assert "temporal operator search-attribute create" in script
    assert "--address temporal:7233" in script
    for key in search_attributes.ALL:
        kind = key.indexed_value_type.name.removeprefix("INDEXED_VALUE_TYPE_").title()
        assert re.search(rf"\bregister {key.name} {kind}\b", script), (
            f"search attribute {key.name} ({kind}) is not registered"
        )


FAKE_TEMPORAL = r"""#!/bin/sh
# Stands in for the Temporal CLI: `operator cluster health`, `operator namespace
# create`, `operator search-attribute list|create`, with the server's state in
# files under $FAKE_STATE.
group="$2"
verb="$3"
name=""
kind=""
retention=""
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift ;;
    --type) kind="$2"; shift ;;
    --retention) retention="$2"; shift ;;
  esac
  shift
done
count() {
  calls=$(($(cat "$FAKE_STATE/$1" 2>/dev/null || echo 0) + 1))
  echo "$calls" > "$FAKE_STATE/$1"
  echo "$calls"
}
case "$group $verb" in
  "cluster health")
    if [ "$(count health_calls)" -le "$FAKE_NOT_SERVING_CALLS" ]; then
      echo "Error: connection refused" >&2
      exit 1
    fi
    echo "SERVING"
    ;;
  "namespace create")
    if [ -n "${FAKE_NAMESPACE_ERROR:-}" ]; then echo "$FAKE_NAMESPACE_ERROR" >&2; exit 1; fi
    if [ -e "$FAKE_STATE/namespace" ]; then
      echo "Error: unable to create namespace: Namespace already exists." >&2
      exit 1
    fi
    echo "$retention" > "$FAKE_STATE/namespace"
    ;;
  "search-attribute list")
    if [ ! -e "$FAKE_STATE/namespace" ] || [ "$(count list_calls)" -le "$FAKE_NAMESPACE_LAG" ]; then
      echo "Namespace default not found" >&2
      exit 1
    fi
    ;;
  "search-attribute create")
    if [ -n "${FAKE_ERROR:-}" ]; then echo "$FAKE_ERROR" >&2; exit 1; fi
    if [ -e "$FAKE_STATE/sa-$name" ]; then
      echo "Error: unable to add search attributes: Search attribute $name already exists." >&2
      exit 1
    fi
    echo "$kind" > "$FAKE_STATE/sa-$name"
    echo "Search attributes have been added"
    ;;
  *) echo "unexpected: $group $verb" >&2; exit 2 ;;
esac
"""

FAKE_SQL_TOOL = r"""#!/bin/sh
# Stands in for temporal-sql-tool: databases and their schema versions are files under
# $FAKE_STATE; every call is logged (its arguments, to check no password is among them).
echo "$*" >> "$FAKE_STATE/sql_calls"
if [ -z "${SQL_PASSWORD:-}" ]; then echo "password authentication failed" >&2; exit 1; fi
db=""
verb=""
while [ $# -gt 0 ]; do
  case "$1" in
    --plugin|--ep|-p|-u|-d|-v) shift ;;
    --db) db="$2"; shift ;;
    create|setup-schema|update-schema) verb="$1" ;;
  esac
  shift
done
if [ -n "${FAKE_SQL_ERROR:-}" ]; then echo "$FAKE_SQL_ERROR" >&2; exit 1; fi
case "$verb" in
  create)
    if [ -e "$FAKE_STATE/db-$db" ]; then echo "database \"$db\" already exists" >&2; exit 1; fi
    : > "$FAKE_STATE/db-$db"
    ;;
  setup-schema)
    if [ ! -e "$FAKE_STATE/db-$db" ]; then echo "database \"$db\" does not exist" >&2; exit 1; fi
    echo "0.0" > "$FAKE_STATE/schema-$db"
    ;;
  update-schema)
    if [ ! -e "$FAKE_STATE/db-$db" ]; then
      echo "pq: database \"$db\" does not exist" >&2
      exit 1
    fi
    if [ ! -e "$FAKE_STATE/schema-$db" ]; then
      echo "pq: relation \"schema_version\" does not exist" >&2
      exit 1
    fi
    echo "current" > "$FAKE_STATE/schema-$db"
    ;;
esac
"""

_DEFAULTED = re.compile(r"^\$\{\w+:-(.*)\}$")


@dataclass
class OneShot:
    """A one-shot service's script, run as its container would, against fake tools."""

    argv: list[str]
    env: dict[str, str]
    bin_dir: Path
    state: Path

    def __call__(self, **fakes: str | int) -> subprocess.CompletedProcess:
        """One run; ``fakes`` are the stand-ins' knobs (FAKE_<NAME> variables)."""
        knobs = {"not_serving_calls": 0, "namespace_lag": 0} | fakes
        env = {
            **self.env,
            "PATH": f"{self.bin_dir}:/usr/bin:/bin",
            "FAKE_STATE": str(self.state),
            **{f"FAKE_{key.upper()}": str(value) for key, value in knobs.items()},
        }
        for counter in ("health_calls", "list_calls", "sql_calls"):
            (self.state / counter).unlink(missing_ok=True)
        return subprocess.run(self.argv, env=env, capture_output=True, text=True, timeout=60)

    def registered(self) -> dict[str, str]:
        """Search attributes the fake server holds, name to type."""
        return {p.name.removeprefix("sa-"): p.read_text().strip() for p in self.state.glob("sa-*")}

    def sql_calls(self) -> list[str]:
        path = self.state / "sql_calls"
        return path.read_text().splitlines() if path.exists() else []

    def schema(self, database: str) -> str | None:
        path = self.state / f"schema-{database}"
        return path.read_text().strip() if path.exists() else None


def _one_shot(compose: dict[str, Any], tmp_path: Path, service_name: str) -> OneShot:
    service = services(compose)[service_name]
    raw_script = argv_of(service["command"])[0]
    # Compose turns `$$` into `$`; a lone `$` would be interpolated by Compose instead.
    assert "$" not in raw_script.replace("$$", ""), f"unescaped $ in {service_name}'s script"
    argv = [*argv_of(service["entrypoint"]), raw_script.replace("$$", "$")]
    if not Path(argv[0]).is_file() or not shutil.which("grep"):
        pytest.skip(f"{argv[0]} or grep is not available here")
    env = {}
    for key, value in environment(service).items():
        defaulted = _DEFAULTED.match(value)
        env[key] = defaulted.group(1) if defaulted else value
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # `sleep` is faked too, so waiting costs no time.
    fakes = {
        "temporal": FAKE_TEMPORAL,
        "temporal-sql-tool": FAKE_SQL_TOOL,
        "sleep": "#!/bin/sh\nexit 0\n",
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    return OneShot(argv, env, bin_dir, state)


@pytest.fixture
def run_setup(compose: dict[str, Any], tmp_path: Path) -> OneShot:
    return _one_shot(compose, tmp_path, "temporal-setup")


@pytest.fixture
def run_schema(compose: dict[str, Any], tmp_path: Path) -> OneShot:
    return _one_shot(compose, tmp_path, "temporal-schema")


# --- temporal-schema -------------------------------------------------------------------


def test_temporal_schema_creates_both_databases_then_only_updates(run_schema: OneShot) -> None:
    run_schema.env["SQL_PASSWORD"] = "s3cret-temporal-db"
    first = run_schema()
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created") == 2
    for database in ("temporal", "temporal_visibility"):
        assert run_schema.schema(database) == "current"
    calls = run_schema.sql_calls()
    assert any("--db temporal setup-schema -v 0.0" in call for call in calls)
    assert any(
        "--db temporal_visibility update-schema -d /etc/temporal/schema/postgresql/v12/"
        "visibility/versioned" in call
        for call in calls
    )
    assert not any("s3cret-temporal-db" in call for call in calls), "password on a command line"

    again = run_schema()  # a later `docker compose up`, perhaps with a newer server image
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("is on the current schema") == 2
    assert [call.split()[-3] for call in run_schema.sql_calls()] == ["update-schema"] * 2


def test_temporal_schema_stops_on_any_other_error(run_schema: OneShot) -> None:
    run_schema.env["SQL_PASSWORD"] = "s3cret-temporal-db"
    failed = run_schema(sql_error="dial tcp 10.0.0.2:5432: connection refused")
    assert failed.returncode != 0
    assert "connection refused" in failed.stderr
    # Nothing is set up over a database it could not read.
    assert not any("setup-schema" in call for call in run_schema.sql_calls())


# --- temporal-setup --------------------------------------------------------------------


def test_temporal_setup_creates_the_namespace_and_registers_once(run_setup: OneShot) -> None:
    first = run_setup(not_serving_calls=3, namespace_lag=2)
    assert first.returncode == 0, first.stderr
    assert "created namespace default (retention 168h)" in first.stdout
    assert (run_setup.state / "namespace").read_text().strip() == "168h"
    assert run_setup.registered() == {
        key.name: key.indexed_value_type.name.removeprefix("INDEXED_VALUE_TYPE_").title()
        for key in search_attributes.ALL
    }
    again = run_setup()  # a second `docker compose up`: everything already exists
    assert again.returncode == 0, again.stderr
    assert "namespace default exists" in again.stdout
    assert again.stdout.count("already registered") == len(search_attributes.ALL)


def test_temporal_setup_fails_on_other_errors(run_setup: OneShot) -> None:
    # Only "already exists" is forgiven; anything else must stop the workers from starting.
    failed = run_setup(error="Error: unable to add search attributes: connection refused")
    assert failed.returncode != 0
    assert "connection refused" in failed.stderr
    (run_setup.state / "namespace").unlink()  # a fresh server this time
    refused = run_setup(namespace_error="Error: permission denied")
    assert refused.returncode != 0
    assert "permission denied" in refused.stderr


def test_temporal_setup_gives_up_when_the_server_never_serves(run_setup: OneShot) -> None:
    failed = run_setup(not_serving_calls=10_000)
    assert failed.returncode != 0
    assert "temporal not serving" in failed.stderr


def test_temporal_setup_gives_up_when_the_namespace_never_appears(run_setup: OneShot) -> None:
    failed = run_setup(namespace_lag=10_000)
    assert failed.returncode != 0
    assert "namespace default not ready" in failed.stderr
