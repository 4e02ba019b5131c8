"""The webhook benchmark's load: realistic signed events, replayed by wrk (or Python).

Events name real provider message ids (of a campaign the benchmark sent), in the mix
a provider sends after a campaign: mostly deliveries and opens, some clicks, delays
and bounces. A share of them is posted a second time with the same svix-id, body and
signature, as an at-least-once provider does. Requests are signed shortly before they
are posted (the service refuses a ``svix-timestamp`` more than 5 minutes off) and
written to a file that ``_webhook_post.lua`` replays, so the client spends no CPU on
JSON or HMAC while it measures.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
from svix.webhooks import Webhook

LUA_SCRIPT = Path(__file__).with_name("_webhook_post.lua")
WRK_INSTALL = "apt-get install wrk"
# (type, share of the events); bounces are two thirds soft, one third hard.
EVENT_MIX = [
    ("email.delivered", 0.60),
    ("email.opened", 0.25),
    ("email.clicked", 0.08),
    ("email.delivery_delayed", 0.04),
    ("email.bounced", 0.03),
]
READY_TIMEOUT_SECONDS = 120.0


def wrk_binary() -> str | None:
    """The path of ``wrk``, or None when it is not installed."""
    return shutil.which("wrk")


def plan_events(
    message_ids: list[str],
    count: int,
    tag: str,
    *,
    duplicates: float,
    seed: int,
    bounces: bool = True,
) -> list[tuple[str, bytes]]:
    """``count`` requests as (svix-id, body): ``duplicates`` of them repeat an earlier one.

    Every svix-id starts with ``tag``, so a run's rows can be counted in the database.
    Without ``bounces`` the mix has none (a bounce suppresses its address).
    """
    if not message_ids:
        raise ValueError("no provider message ids to name in events")
    rng = random.Random(seed)
    mix = [(kind, share) for kind, share in EVENT_MIX if bounces or kind != "email.bounced"]
    kinds = [kind for kind, _ in mix]
    weights = [share for _, share in mix]
    created_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    planned: list[tuple[str, bytes]] = []
    for number in range(count):
        if planned and rng.random() < duplicates:
            planned.append(planned[rng.randrange(len(planned))])
            continue
        kind = rng.choices(kinds, weights)[0]
        data: dict = {"email_id": rng.choice(message_ids), "to": ["reader@bench.example.com"]}
        if kind == "email.bounced":
            data["bounce"] = {"type": "Permanent" if rng.random() < 1 / 3 else "Transient"}
        body = orjson.dumps({"type": kind, "created_at": created_at, "data": data})
        planned.append((f"{tag}_{number}", body))
    return planned


def write_requests(path: Path, planned: list[tuple[str, bytes]], secret: str) -> None:
    """Sign every request now and write the file ``_webhook_post.lua`` replays.

    A repeated request is signed once: its copy carries the very same headers.
    """
    webhook = Webhook(secret)
    now = datetime.now(UTC)
    stamp = str(int(now.timestamp()))
    signatures: dict[str, str] = {}
    with path.open("w") as out:
        for svix_id, body in planned:
            signature = signatures.get(svix_id)
            if signature is None:
                signature = signatures[svix_id] = webhook.sign(svix_id, now, body.decode())
            out.write(f"{svix_id}\t{stamp}\t{signature}\t{body.decode()}\n")


@dataclass
class LoadResult:
    """What the client saw: answers by status, latency, and the time it took."""

    statuses: dict[str, int]
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: int
    client: str
    client_pid: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> int:
        """Requests answered 200 (stored, or a duplicate of a stored event)."""
        return self.statuses.get("200", 0)

    @property
    def ok_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


class WrkLoad:
    """One wrk process replaying a request file: ``start``, then ``wait`` or ``stop``."""

    def __init__(
        self,
        url: str,
        requests_file: Path,
        *,
        connections: int,
        threads: int = 1,
        rate: float = 0.0,
        once: bool = True,
    ) -> None:
        binary = wrk_binary()
        if binary is None:
            raise RuntimeError(f"wrk is not installed ({WRK_INSTALL})")
        self._args = [
            binary,
            f"-t{threads}",
            f"-c{max(connections, threads)}",
            "-d3600s",  # stopped by us: when every line is answered, or when the storm ends
            "--timeout",
            "20s",
            "-s",
            str(LUA_SCRIPT),
            url,
            "--",
            str(requests_file),
            str(rate),
            "once" if once else "loop",
            str(threads),
        ]
        self._threads = threads
        self._process: asyncio.subprocess.Process | None = None
        self._lines: list[str] = []

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        """Start wrk; returns once every thread has loaded its requests."""
        self._process = await asyncio.create_subprocess_exec(
            *self._args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        await self._read_until("ready", self._threads, READY_TIMEOUT_SECONDS)

    async def wait(self, within: float) -> LoadResult:
        """Wait until every request of the file is answered (mode ``once``)."""
        await self._read_until("finished", self._threads, within)
        return await self.stop()

    async def stop(self) -> LoadResult:
        """Stop wrk (SIGINT: it prints its results) and parse them."""
        assert self._process is not None and self._process.stdout is not None
        if self._process.returncode is None:
            self._process.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(self._process.stdout.read(), timeout=30)
        await self._process.wait()
        self._lines.extend(rest.decode(errors="replace").splitlines())
        for line in self._lines:
            if line.startswith("RESULT "):
                figures = json.loads(line.removeprefix("RESULT "))
                break
        else:
            raise RuntimeError("wrk printed no result:\n" + "\n".join(self._lines[-20:]))
        errors = sum(figures[k] for k in ("connect_errors", "read_errors", "write_errors"))
        return LoadResult(
            statuses=figures["statuses"],
            seconds=(figures["last_ms"] - figures["first_ms"]) / 1000,
            p50_ms=figures["p50_us"] / 1000,
            p99_ms=figures["p99_us"] / 1000,
            max_ms=figures["max_us"] / 1000,
            socket_errors=errors + figures["timeouts"],
            client="wrk",
            client_pid=self._process.pid,
            extra={"first_monotonic": figures["first_ms"] / 1000},
        )

    async def _read_until(self, word: str, count: int, within: float) -> None:
        assert self._process is not None and self._process.stdout is not None
        seen = 0
        deadline = time.monotonic() + within
        while seen < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"wrk did not say {word!r} within {within:.0f}s")
            raw = await asyncio.wait_for(self._process.stdout.readline(), timeout=left)
            if not raw:
                raise RuntimeError("wrk exited:\n" + "\n".join(self._lines[-20:]))
            line = raw.decode(errors="replace").rstrip("\n")
            self._lines.append(line)
            seen += line.startswith(word + " ")


class PythonLoad:
    """The fallback client when wrk is missing (aiohttp): it costs about as much CPU per
    request as the server, so its figure is bound by the client, not the service."""

    def __init__(
        self,
        url: str,
        requests_file: Path,
        *,
        connections: int,
        rate: float = 0.0,
        once: bool = True,
    ) -> None:
        self._url = url
        self._lines = requests_file.read_text().splitlines()
        self._connections = connections
        self._rate = rate
        self._once = once
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[LoadResult] | None = None

    pid = None

    async def start(self) -> None:
        """Start posting in this process."""
        self._task = asyncio.create_task(self._run())

    async def wait(self, within: float) -> LoadResult:
        """Wait until every request is answered."""
        assert self._task is not None
        return await asyncio.wait_for(self._task, within)

    async def stop(self) -> LoadResult:
        """Stop posting and return what was measured."""
        assert self._task is not None
        self._stopping.set()
        return await self._task

    async def _run(self) -> LoadResult:
        import aiohttp

        statuses: Counter[str] = Counter()
        latencies: list[float] = []
        errors = 0
        sent = 0
        started = time.monotonic()
        interval = 1 / self._rate if self._rate > 0 else 0.0

        def take() -> str | None:
            nonlocal sent
            if self._stopping.is_set() or (self._once and sent >= len(self._lines)):
                return None
            line = self._lines[sent % len(self._lines)]
            sent += 1
            return line

        async def post(session: aiohttp.ClientSession) -> None:
            nonlocal errors
            while (line := take()) is not None:
                if interval:
                    due = started + (sent - 1) * interval - time.monotonic()
                    if due > 0:
                        await asyncio.sleep(due)
                svix_id, stamp, signature, body = line.split("\t", 3)
                headers = {
                    "content-type": "application/json",
                    "svix-id": svix_id,
                    "svix-timestamp": stamp,
                    "svix-signature": signature,
                }
                begun = time.perf_counter()
                try:
                    async with session.post(self._url, data=body, headers=headers) as answer:
                        await answer.read()
                        statuses[str(answer.status)] += 1
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - begun)

        connector = aiohttp.TCPConnector(limit=self._connections)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(post(session) for _ in range(self._connections)))
        seconds = time.monotonic() - started
        latencies.sort()

        def at(share: float) -> float:
            return latencies[min(int(len(latencies) * share), len(latencies) - 1)] * 1000

        return LoadResult(
            statuses=dict(statuses),
            seconds=seconds,
            p50_ms=at(0.5) if latencies else 0.0,
            p99_ms=at(0.99) if latencies else 0.0,
            max_ms=latencies[-1] * 1000 if latencies else 0.0,
            socket_errors=errors,
            client="python aiohttp (client-bound)",
            extra={"first_monotonic": started},
        )


def make_load(
    url: str,
    requests_file: Path,
    *,
    connections: int,
    threads: int = 1,
    rate: float = 0.0,
    once: bool = True,
) -> WrkLoad | PythonLoad:
    """wrk when installed, else the Python client."""
    if wrk_binary() is not None:
        return WrkLoad(
            url, requests_file, connections=connections, threads=threads, rate=rate, once=once
        )
    return PythonLoad(url, requests_file, connections=connections, rate=rate, once=once)
