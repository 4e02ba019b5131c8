"""CPU time of the processes a benchmark run involves, measured from a separate process.

The sampler runs as its own process (``python -m bench._cpu``) so that reading
``/proc`` neither costs the benchmark process CPU nor holds its GIL while the plain
loop runs in it. It speaks JSON lines on stdin/stdout:

* ``{"cmd": "start", "groups": {...}, "alone": [...], "postgres": {...} | null}``
  takes a first snapshot of every group's processes (with their children, except
  for the groups listed in ``alone``) and answers ``{"ok": true}``;
* until the next line it samples every ``TICK_SECONDS``, to catch processes that start
  during the run (a pool's new connections, hence new PostgreSQL backends);
* ``{"cmd": "stop"}`` takes a last snapshot and answers with each group's CPU
  seconds (user + system) over the run.

A process seen for the first time after the start counts from zero if it was created
during the run (its whole life is the run's), else from its first sample. A process
that exits between two samples loses at most one tick of CPU time.

PostgreSQL backends are the postmaster's children whose process title names the
benchmark's database and, over TCP, whose client port is one of the benchmark's own
connections (so another session on the same server and database is not counted).
The server's background processes (checkpointer, WAL writer, autovacuum...) are
reported apart: they serve every database of the server.
"""

from __future__ import annotations

import asyncio
import json
import re
import select
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil

TICK_SECONDS = 0.25
POSTGRES_BACKENDS = "PostgreSQL backends"
POSTGRES_BACKGROUND = "PostgreSQL background"

# "postgres: [cluster: ]user database host(port) activity" or "... [local] activity".
_BACKEND_TITLE = re.compile(r" (?P<user>\S+) (?P<db>\S+) (?:\[local\]|\S+\((?P<port>\d+)\))(?: |$)")


def process_title(pid: int) -> str:
    """The title a PostgreSQL process set for itself (its rewritten command line)."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def parse_backend_title(title: str) -> tuple[str, int | None] | None:
    """(database, client port or None for a Unix socket) of a client backend, else None."""
    match = _BACKEND_TITLE.search(title)
    if not title.startswith("postgres") or match is None:
        return None
    return match["db"], int(match["port"]) if match["port"] else None


@dataclass
class _Seen:
    baseline: float
    last: float


@dataclass
class _Group:
    """CPU seconds of a changing set of processes, summed over one run."""

    seen: dict[tuple[int, float], _Seen] = field(default_factory=dict)

    def observe(self, processes: list[psutil.Process], started: float, first: bool) -> None:
        for process in processes:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    created = process.create_time()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            cpu = times.user + times.system
            key = (process.pid, created)
            if key in self.seen:
                self.seen[key].last = cpu
            else:
                born_during_run = not first and created >= started
                self.seen[key] = _Seen(0.0 if born_during_run else cpu, cpu)

    def total(self) -> float:
        return sum(s.last - s.baseline for s in self.seen.values())


def _processes(pids: list[int], children: bool = True) -> list[psutil.Process]:
    processes = []
    for pid in pids:
        try:
            parent = psutil.Process(pid)
            processes.append(parent)
            if children:
                processes.extend(parent.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return processes


class Sampler:
    """One run's measurement, driven by the start/stop commands."""

    def __init__(self, command: dict) -> None:
        self.pids: dict[str, list[int]] = command["groups"]
        # The benchmark process's children are the stack's services (and this sampler).
        self.alone = set(command.get("alone", []))
        self.postgres: dict | None = command.get("postgres")
        self.groups = {name: _Group() for name in self.pids}
        if self.postgres:
            self.groups[POSTGRES_BACKENDS] = _Group()
            self.groups[POSTGRES_BACKGROUND] = _Group()
        self.started = time.time()
        self.sample(first=True)

    def sample(self, first: bool = False) -> None:
        for name, pids in self.pids.items():
            processes = _processes(pids, children=name not in self.alone)
            self.groups[name].observe(processes, self.started, first)
        if self.postgres:
            backends, background = self._postgres_processes()
            self.groups[POSTGRES_BACKENDS].observe(backends, self.started, first)
            self.groups[POSTGRES_BACKGROUND].observe(background, self.started, first)

    def _postgres_processes(self) -> tuple[list[psutil.Process], list[psutil.Process]]:
        assert self.postgres is not None
        try:
            children = psutil.Process(self.postgres["postmaster"]).children()
        except psutil.NoSuchProcess:
            return [], []
        ports = self._client_ports() if self.postgres["match_ports"] else None
        backends, background = [], []
        for child in children:
            try:
                parsed = parse_backend_title(process_title(child.pid))
            except OSError:
                continue
            if parsed is None:
                background.append(child)
                continue
            database, port = parsed
            if database != self.postgres["database"]:
                continue
            if ports is not None and port is not None and port not in ports:
                continue
            backends.append(child)
        return backends, background

    def _client_ports(self) -> set[int]:
        """Local ports of the benchmark's own connections to the server."""
        assert self.postgres is not None
        server_port = self.postgres["server_port"]
        ports = set()
        for process in _processes(self.postgres["clients"], children=False):
            try:
                connections = process.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            ports.update(
                c.laddr.port for c in connections if c.raddr and c.raddr.port == server_port
            )
        return ports

    def totals(self) -> dict[str, float]:
        self.sample()
        return {name: group.total() for name, group in self.groups.items()}


def serve() -> None:
    """The sampler process's loop: answer start/stop, sample in between."""
    sampler: Sampler | None = None
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], TICK_SECONDS)
        if not ready:
            if sampler is not None:
                sampler.sample()
            continue
        line = sys.stdin.readline()
        if not line:
            return
        command = json.loads(line)
        if command["cmd"] == "start":
            sampler = Sampler(command)
            answer: dict = {"ok": True}
        else:
            assert sampler is not None, "stop before start"
            answer = {"cpu": sampler.totals()}
            sampler = None
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


class CpuMeter:
    """The benchmark's side of the sampler: ``async with CpuMeter() as meter: ...``."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> CpuMeter:
        root = Path(__file__).resolve().parent.parent
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench._cpu",
            cwd=root,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.close()
        await self._process.wait()

    async def _ask(self, command: dict) -> dict:
        assert self._process is not None
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write((json.dumps(command) + "\n").encode())
        await self._process.stdin.drain()
        line = await self._process.stdout.readline()
        if not line:
            raise RuntimeError("the CPU sampler exited")
        return json.loads(line)

    async def start(
        self,
        groups: dict[str, list[int]],
        postgres: dict | None,
        alone: tuple[str, ...] = (),
    ) -> None:
        """First snapshot; returns once it is taken, so the run may begin.

        Each group counts its processes and their children, except the groups named
        in ``alone``, which count only the processes listed.
        """
        command = {"cmd": "start", "groups": groups, "alone": list(alone), "postgres": postgres}
        await self._ask(command)

    async def stop(self) -> dict[str, float]:
        """CPU seconds of each group since ``start``."""
        return (await self._ask({"cmd": "stop"}))["cpu"]


async def locate_postgres(pool: asyncpg.Pool, *, private: bool) -> tuple[dict | None, str]:
    """Where the benchmark's database is served: the sampler's ``postgres`` config.

    Returns ``(config, note)``, or ``(None, reason)`` when the server's processes
    cannot be seen from here (a remote server, another container, no permission to
    read their titles). ``private`` is for a server that only the benchmark uses (the
    embedded one): every backend on the database is then the benchmark's.
    """
    row = await pool.fetchrow(
        "SELECT pg_backend_pid() AS pid, current_database() AS db,"
        " inet_server_port() AS port, inet_client_port() AS client_port"
    )
    pid = row["pid"]
    try:
        backend = psutil.Process(pid)
        title = process_title(pid)
        postmaster = backend.ppid()
    except psutil.NoSuchProcess:
        return None, f"the server's backend {pid} is no process here (a remote server?)"
    except (psutil.AccessDenied, PermissionError):
        return None, "cannot read the PostgreSQL processes' titles (run as root or postgres)"
    parsed = parse_backend_title(title)
    if parsed is None:
        return None, f"pid {pid} has no backend title ({title!r}): update_process_title off?"
    database, port = parsed
    if database != row["db"] or port != row["client_port"]:
        return None, f"pid {pid} here is not the server's backend (a server elsewhere?)"
    match_ports = not private and port is not None
    if private:
        note = f"backends on {database} of the benchmark's own server"
    elif match_ports:
        note = f"backends on {database} serving the benchmark's own connections"
    else:
        note = f"all backends on {database} (Unix socket: other sessions on it would count)"
    config = {
        "postmaster": postmaster,
        "database": database,
        "server_port": row["port"],
        "match_ports": match_ports,
        "clients": [],
    }
    return config, note


if __name__ == "__main__":
    serve()
