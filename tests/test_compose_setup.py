"""The temporal-setup service of docker-compose.yml: its script, run against a stand-in
``temporal`` CLI, registers every search attribute once, is idempotent, and fails on
anything else."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from campaigns import search_attributes
from tests.test_compose import argv_of, dependencies, load_compose, services


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def test_temporal_setup_registers_every_search_attribute(compose: dict[str, Any]) -> None:
    setup = services(compose)["temporal-setup"]
    assert setup["image"].startswith("temporalio/admin-tools:")
    assert dependencies(setup) == {"temporal": "service_healthy"}
    script = "\n".join(argv_of(setup["entrypoint"]) + argv_of(setup["command"]))
    assert "temporal operator search-attribute create" in script
    assert "--address temporal:7233" in script
    for key in search_attributes.ALL:
        kind = key.indexed_value_type.name.removeprefix("INDEXED_VALUE_TYPE_").title()
        assert re.search(rf"\bregister {key.name} {kind}\b", script), (
            f"search attribute {key.name} ({kind}) is not registered"
        )


FAKE_TEMPORAL = r"""#!/bin/sh
# Stands in for the Temporal CLI: `operator search-attribute list|create`, with its state
# (namespace readiness, registered attributes) in files under $FAKE_STATE.
command="$3"
name=""
kind=""
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift ;;
    --type) kind="$2"; shift ;;
  esac
  shift
done
case "$command" in
  list)
    calls=$(($(cat "$FAKE_STATE/list_calls" 2>/dev/null || echo 0) + 1))
    echo "$calls" > "$FAKE_STATE/list_calls"
    if [ "$calls" -le "$FAKE_NOT_READY_CALLS" ]; then
      echo "Namespace default not found" >&2
      exit 1
    fi
    ;;
  create)
    if [ -n "${FAKE_ERROR:-}" ]; then echo "$FAKE_ERROR" >&2; exit 1; fi
    if [ -e "$FAKE_STATE/sa-$name" ]; then
      echo "Error: unable to add search attributes: Search attribute $name already exists." >&2
      exit 1
    fi
    echo "$kind" > "$FAKE_STATE/sa-$name"
    echo "Search attributes have been added"
    ;;
esac
"""


@dataclass
class SetupRunner:
    """Runs temporal-setup's script as its container would, against a fake Temporal CLI."""

    argv: list[str]
    bin_dir: Path
    state: Path

    def __call__(self, not_ready_calls: int = 0, error: str = "") -> subprocess.CompletedProcess:
        """One run; the namespace answers after ``not_ready_calls`` failed checks."""
        env = {
            "PATH": f"{self.bin_dir}:/usr/bin:/bin",
            "FAKE_STATE": str(self.state),
            "FAKE_NOT_READY_CALLS": str(not_ready_calls),
            "FAKE_ERROR": error,
        }
        (self.state / "list_calls").unlink(missing_ok=True)
        return subprocess.run(self.argv, env=env, capture_output=True, text=True, timeout=60)

    def registered(self) -> dict[str, str]:
        """Search attributes the fake server holds, name to type."""
        return {p.name.removeprefix("sa-"): p.read_text().strip() for p in self.state.glob("sa-*")}


@pytest.fixture
def run_setup(compose: dict[str, Any], tmp_path: Path) -> SetupRunner:
    setup = services(compose)["temporal-setup"]
    raw_script = argv_of(setup["command"])[0]
    # Compose turns `$$` into `$`; a lone `$` would be interpolated by Compose instead.
    assert "$" not in raw_script.replace("$$", ""), "unescaped $ in temporal-setup's script"
    argv = [*argv_of(setup["entrypoint"]), raw_script.replace("$$", "$")]
    if not Path(argv[0]).is_file() or not shutil.which("grep"):
        pytest.skip(f"{argv[0]} or grep is not available here")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # `sleep` is faked too, so waiting for the namespace costs no time.
    for name, body in (("temporal", FAKE_TEMPORAL), ("sleep", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    return SetupRunner(argv, bin_dir, state)


def test_temporal_setup_registers_once_and_is_idempotent(run_setup: SetupRunner) -> None:
    first = run_setup(not_ready_calls=3)  # waits for the namespace, then registers
    assert first.returncode == 0, first.stderr
    assert run_setup.registered() == {
        key.name: key.indexed_value_type.name.removeprefix("INDEXED_VALUE_TYPE_").title()
        for key in search_attributes.ALL
    }
    again = run_setup()  # a second `docker compose up`: everything already exists
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already registered") == len(search_attributes.ALL)


def test_temporal_setup_fails_on_other_errors(run_setup: SetupRunner) -> None:
    # Only "already exists" is forgiven; anything else must stop the workers from starting.
    failed = run_setup(error="Error: unable to add search attributes: connection refused")
    assert failed.returncode != 0
    assert "connection refused" in failed.stderr


def test_temporal_setup_gives_up_when_the_namespace_never_appears(run_setup: SetupRunner) -> None:
    failed = run_setup(not_ready_calls=10_000)
    assert failed.returncode != 0
    assert "namespace default not ready" in failed.stderr
