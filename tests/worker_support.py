"""Worker processes for tests: ``python worker.py`` as users run it."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from campaigns.settings import Settings
from tests.conftest import TEST_API_KEY

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """``python worker.py`` on its own task queue."""

    def __init__(
        self,
        settings: Settings,
        task_queue: str,
        log_path: Path,
        *,
        metrics_address: str = "off",
    ) -> None:
        self.env = {
            **os.environ,
            "TEMPORAL_ADDRESS": settings.temporal_address,
            "CAMPAIGNS_TASK_QUEUE": task_queue,
            "DATABASE_URL": settings.database_url or "",
            "PROVIDER_BASE_URL": settings.provider_base_url or "",
            "PROVIDER_API_KEY": TEST_API_KEY,
            "UNSUBSCRIBE_BASE_URL": settings.unsubscribe_base_url or "",
            "UNSUBSCRIBE_SECRET": (
                settings.unsubscribe_secret.get_secret_value()
                if settings.unsubscribe_secret
                else ""
            ),
            "WORKER_GRACEFUL_SHUTDOWN_SECONDS": "20",
            "CAMPAIGNS_DATA_DIR": str(log_path.parent),
            "LOG_FORMAT": "json",
            "WORKER_METRICS_ADDRESS": metrics_address,
        }
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "worker.py", cwd=ROOT, env=self.env, stdout=log, stderr=log
        )

    async def signal(self, signum: int) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def worker_processes(
    settings: Settings, task_queue: str, directory: Path
) -> AsyncIterator[Callable[..., WorkerProcess]]:
    """A maker of worker processes on ``task_queue`` (logs in ``directory``); every
    process it made that still runs is killed on the way out."""
    started: list[WorkerProcess] = []

    def make(metrics_address: str = "off") -> WorkerProcess:
        process = WorkerProcess(
            settings,
            task_queue,
            directory / f"worker-{len(started)}.log",
            metrics_address=metrics_address,
        )
        started.append(process)
        return process

    try:
        yield make
    finally:
        for process in started:
            if process.process and process.process.returncode is None:
                process.process.kill()
                await process.process.wait()
