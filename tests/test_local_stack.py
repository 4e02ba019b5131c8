"""The local stack as a new user runs it: up, demo, Ctrl-C, restart keeps history.

The demo test runs without DATABASE_URL, so it also proves the embedded PostgreSQL path
that a machine without a database server takes. The secrets test runs the stack on a
database URL with a password, a provider key of its own and a data directory an older
version left world-readable.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest
from dotenv import dotenv_values


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# What the stack takes from the environment or writes to stack.env: never inherited here.
STACK_VARIABLES = (
    "DATABASE_URL",
    "PROVIDER_API_KEY",
    "PROVIDER_BASE_URL",
    "SIMULATOR_ADMIN_TOKEN",
    "SIMULATOR_API_KEYS",
    "WEBHOOK_SECRET",
    "UNSUBSCRIBE_BASE_URL",
    "UNSUBSCRIBE_SECRET",
)


def stack_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in STACK_VARIABLES}
    env["CAMPAIGNS_DATA_DIR"] = str(data_dir)
    env["COLUMNS"] = "120"
    return env


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "campaigns.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=150)
    return process.returncode or 0, out.decode(), err.decode()


async def wait_for_file(path: Path, process: asyncio.subprocess.Process) -> dict:
    """Poll until the stack writes its state file (or dies)."""
    async with asyncio.timeout(120):
        while not path.exists():
            if process.returncode is not None:
                output = await process.stdout.read() if process.stdout else b""
                raise AssertionError(f"stack exited with {process.returncode}: {output.decode()}")
            await asyncio.sleep(0.1)
    return json.loads(path.read_text())


@pytest.fixture
async def stacks() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Stacks a test starts; any still running at the end are stopped."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), timeout=90)


async def start_stack(
    stacks: list[asyncio.subprocess.Process], env: dict[str, str], ports: dict[str, int]
) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "campaigns.cli",
        "stack",
        "up",
        "--temporal-port",
        str(ports["temporal"]),
        "--ui-port",
        str(ports["ui"]),
        "--simulator-port",
        str(ports["simulator"]),
        "--api-port",
        str(ports["api"]),
        "--metrics-port",
        str(ports["metrics"]),
        "--workers",
        "1",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    stacks.append(process)
    return process


async def stop_with_ctrl_c(process: asyncio.subprocess.Process, state: dict) -> str:
    process.send_signal(signal.SIGINT)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=90)
    assert process.returncode == 0, output.decode()
    for name, pid in state["services"].items():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", name
    return output.decode()


async def test_taken_port_gives_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, _, err = await run_cli(
            stack_env(tmp_path / "data"),
            "stack",
            "up",
            "--simulator-port",
            str(port),
            "--temporal-port",
            str(free_port()),
            "--ui-port",
            str(free_port()),
            "--api-port",
            str(free_port()),
        )
    assert code == 1
    message = " ".join(err.split())
    assert f"port {port} (provider simulator) is already in use" in message
    assert "--simulator-port" in message
    assert not (tmp_path / "data" / "stack.json").exists()


async def test_taken_port_is_said_first_and_alone_when_detached(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "logs").mkdir(parents=True)
    (data_dir / "logs" / "stack.log").write_text("a line an earlier run logged\n" * 50)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, _, err = await run_cli(
            stack_env(data_dir),
            "stack",
            "up",
            "--detach",
            "--temporal-port",
            str(port),
            "--ui-port",
            str(free_port()),
            "--simulator-port",
            str(free_port()),
            "--api-port",
            str(free_port()),
        )
    assert code == 1
    message = " ".join(err.split())
    assert message.startswith(f"error: port {port} (Temporal frontend) is already in use")
    assert "--temporal-port" in message
    assert "earlier run" not in err
    assert not (data_dir / "stack.json").exists()


@pytest.mark.slow
async def test_stack_runs_the_demo_stops_on_ctrl_c_and_keeps_history(
    tmp_path: Path, stacks: list[asyncio.subprocess.Process]
) -> None:
    data_dir = tmp_path / "data"
    env = stack_env(data_dir)
    ports = {name: free_port() for name in ("temporal", "ui", "simulator", "api", "metrics")}

    process = await start_stack(stacks, env, ports)
    state = await wait_for_file(data_dir / "stack.json", process)
    assert state["temporal_address"] == f"127.0.0.1:{ports['temporal']}"
    assert (data_dir / "pg" / "PG_VERSION").exists()  # embedded PostgreSQL
    assert oct((data_dir / "stack.env").stat().st_mode & 0o777) == "0o600"
    assert mode(data_dir / "stack.json") == 0o600 and "database_url" not in state
    assert mode(data_dir / "pg") == mode(data_dir / "logs") == 0o700
    # As root, the embedded server runs as a user of its own, who must traverse data_dir.
    assert mode(data_dir) == (0o711 if os.geteuid() == 0 else 0o700)
    async with httpx.AsyncClient() as http:
        ui = await http.get(f"http://127.0.0.1:{ports['ui']}/")
        assert ui.status_code == 200
    code, out, err = await run_cli(env, "schedules", "describe")
    assert code == 0, err
    assert "first-party-orgs-refresh" in out and "every        1:00:00" in out
    code, out, err = await run_cli(env, "demo", "--recipients", "300")
    assert code == 0, out + err
    assert "300 emails accepted for 300 recipients" in " ".join(out.split())
    assert "(exactly once)" in out
    # The provider's webhooks were applied, and the worker's metrics counted the sends.
    assert "suppressed for org demo" in " ".join(out.split())
    async with httpx.AsyncClient() as http:
        scraped = (await http.get(state["worker_metrics"][0])).text
    assert "campaigns_emails_total{" in scraped and 'org="demo"' in scraped
    output = await stop_with_ctrl_c(process, state)
    assert "local stack stopped" in output
    assert not (data_dir / "stack.json").exists()

    process = await start_stack(stacks, env, ports)
    state = await wait_for_file(data_dir / "stack.json", process)
    code, out, err = await run_cli(env, "list", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert len(listed) == 1 and listed[0]["state"] == "Completed"
    assert listed[0]["workflow_id"].startswith("demo-")
    await stop_with_ctrl_c(process, state)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def not_private(data_dir: Path) -> list[str]:
    """What under ``data_dir`` its group or others may read, but for the files inside the
    embedded PostgreSQL's directory, which the server guards itself."""
    found = []
    for path in [data_dir, *data_dir.rglob("*")]:
        inside_pg = path.relative_to(data_dir).parts[:1] == ("pg",) and path != data_dir / "pg"
        try:
            if not inside_pg and not path.is_symlink() and mode(path) & 0o077:
                found.append(f"{path.relative_to(data_dir)} {oct(mode(path))}")
        except FileNotFoundError:
            pass  # a journal file the server removed meanwhile
    return found


def with_password(url: str, password: str) -> tuple[str, str | None]:
    """``url`` with ``password`` for its user when it has none; the password it ends with.

    The test servers trust local connections, so they accept any password."""
    scheme, _, rest = url.partition("://")
    userinfo, at, host = rest.partition("@")
    if not at:
        return url, None
    user, _, existing = userinfo.partition(":")
    if existing:
        return url, existing
    return f"{scheme}://{user}:{password}@{host}", password


@pytest.fixture
async def stack_database(pg_admin_url: str) -> AsyncIterator[str]:
    """A database of its own for a stack (which migrates it), dropped afterwards."""
    name = f"campaigns_stack_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    head, _, query = pg_admin_url.partition("?")
    url = f"{head.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    try:
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_stack_files_are_private_and_hold_no_secrets(
    tmp_path: Path, stacks: list[asyncio.subprocess.Process], stack_database: str
) -> None:
    data_dir = tmp_path / "data"
    # What an older version left: open directories, world-readable files.
    for directory in (data_dir / "logs", data_dir / "demo"):
        directory.mkdir(parents=True)
    for path in (
        data_dir / "stack.env",
        data_dir / "logs" / "worker-1.log",
        data_dir / "demo" / "audience-1.csv",
    ):
        path.write_text("email\nold@example.com\n" if path.suffix == ".csv" else "")
        path.chmod(0o644)
    for directory in (data_dir, data_dir / "logs", data_dir / "demo"):
        directory.chmod(0o755)

    database_url, password = with_password(stack_database, "s3cret-pw")
    api_key = "re_live_" + uuid.uuid4().hex
    env = {
        **stack_env(data_dir),
        "DATABASE_URL": database_url,
        "PROVIDER_API_KEY": api_key,
        "PROVIDER_BASE_URL": "https://api.provider.invalid",
    }
    ports = {name: free_port() for name in ("temporal", "ui", "simulator", "api", "metrics")}
    process = await start_stack(stacks, env, ports)
    state = await wait_for_file(data_dir / "stack.json", process)

    assert not not_private(data_dir), not_private(data_dir)
    for directory in (data_dir, data_dir / "logs", data_dir / "demo"):
        assert mode(directory) == 0o700, directory
    for name in (
        "stack.json",
        "stack.env",
        "temporal.db",
        "logs/worker-1.log",
        "logs/simulator.log",
        "logs/api.log",
    ):
        assert mode(data_dir / name) & 0o077 == 0, name

    # The secrets are in stack.env only: the workers' key is the one we gave.
    written = dotenv_values(data_dir / "stack.env")
    assert written["PROVIDER_API_KEY"] == api_key
    assert written["DATABASE_URL"] == database_url
    admin_token = written["SIMULATOR_ADMIN_TOKEN"]
    assert admin_token and admin_token != api_key
    webhook_secret, unsubscribe_secret = written["WEBHOOK_SECRET"], written["UNSUBSCRIBE_SECRET"]
    assert webhook_secret.startswith("whsec_") and len(unsubscribe_secret or "") >= 32
    assert written["UNSUBSCRIBE_BASE_URL"] == state["api_url"]
    secrets = [api_key, admin_token, webhook_secret, unsubscribe_secret]
    secrets += [password] if password else []
    stack_json = (data_dir / "stack.json").read_text()
    assert not [secret for secret in secrets if secret in stack_json]

    simulator = state["provider_base_url"]
    async with httpx.AsyncClient(base_url=simulator) as http:
        assert (await http.get("/_sim/stats")).status_code == 401
        auth = {"Authorization": f"Bearer {admin_token}"}
        assert (await http.get("/_sim/stats", headers=auth)).status_code == 200
    async with httpx.AsyncClient(base_url=state["api_url"]) as http:
        ready = (await http.get("/readyz")).json()
        assert ready["database"] == "ok" and ready["webhooks"] is True
    [metrics_url] = state["worker_metrics"]
    assert metrics_url == f"http://127.0.0.1:{ports['metrics']}/metrics"

    # The CLI, with nothing exported, finds the database and the admin token; the demo
    # sends through the workers, so the simulator accepted our key.
    cli_env = stack_env(data_dir)
    code, out, err = await run_cli(cli_env, "demo", "--recipients", "100")
    assert code == 0, out + err
    assert "(exactly once)" in out
    code, listed, err = await run_cli(cli_env, "org", "list")
    assert code == 0 and "demo" in listed, listed + err
    code, status, err = await run_cli(cli_env, "stack", "status")
    assert code == 0, err
    assert mode(data_dir / "demo") == 0o700
    assert mode(data_dir / "demo" / "audience-100.csv") == 0o600
    assert mode(data_dir / "demo" / "spec.json") == 0o600
    assert not not_private(data_dir), not_private(data_dir)

    output = await stop_with_ctrl_c(process, state)
    assert "PROVIDER_BASE_URL is ignored" in output
    logs = "".join(path.read_text(errors="replace") for path in (data_dir / "logs").iterdir())
    for text in (output, out, err, listed, status, logs):
        assert not [secret for secret in secrets if secret in text]


def test_generated_secrets_outlive_a_restart_and_stay_private(tmp_path: Path) -> None:
    from campaigns.stack import kept_secrets

    path = tmp_path / "secrets.env"
    made = iter(["first-a", "first-b", "second-b"])
    makers = {"A": lambda: next(made), "B": lambda: next(made)}
    first = kept_secrets(path, makers)
    assert first == {"A": "first-a", "B": "first-b"}
    assert mode(path) == 0o600
    assert kept_secrets(path, makers) == first  # a restart keeps them
    path.write_text("A=first-a\nB=bad value\n")  # damaged: that one is made anew
    assert kept_secrets(path, makers) == {"A": "first-a", "B": "second-b"}
