"""The local stack as a new user runs it: up, demo, Ctrl-C, restart keeps history.

It runs without DATABASE_URL, so it also proves the embedded PostgreSQL path that a
machine without a database server takes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stack_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
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
                raise AssertionError(f"stack exited with {process.returncode}")
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
        )
    assert code == 1
    message = " ".join(err.split())
    assert f"port {port} (provider simulator) is already in use" in message
    assert "--simulator-port" in message
    assert not (tmp_path / "data" / "stack.json").exists()


async def test_stack_runs_the_demo_stops_on_ctrl_c_and_keeps_history(
    tmp_path: Path, stacks: list[asyncio.subprocess.Process]
) -> None:
    data_dir = tmp_path / "data"
    env = stack_env(data_dir)
    ports = {"temporal": free_port(), "ui": free_port(), "simulator": free_port()}

    process = await start_stack(stacks, env, ports)
    state = await wait_for_file(data_dir / "stack.json", process)
    assert state["temporal_address"] == f"127.0.0.1:{ports['temporal']}"
    assert (data_dir / "pg" / "PG_VERSION").exists()  # embedded PostgreSQL
    assert oct((data_dir / "stack.env").stat().st_mode & 0o777) == "0o600"
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
