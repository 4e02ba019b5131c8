"""The HTTP service served for real (uvicorn on a free port) and signed webhooks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import uvicorn
from pydantic import SecretStr
from svix.webhooks import Webhook

from campaigns.api import create_app
from campaigns.settings import Settings

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"test webhook signing key, 32 b!!").decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serve_api(settings: Settings, **updates: Any) -> AsyncIterator[str]:
    """Serve the app for the block (on ``api_port`` if given, else a free port); yield its
    base URL."""
    settings = settings.model_copy(update={"webhook_secret": SecretStr(WEBHOOK_SECRET), **updates})
    port = updates.get("api_port") or free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        loop="asyncio",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if not server.started:
        task.result()  # raises what stopped it
        raise RuntimeError("the API did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def event(kind: str, email_id: str, *, at: str | None = None, **data: Any) -> dict[str, Any]:
    """A provider event in Resend's shape."""
    return {
        "type": kind,
        "created_at": at or datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": {"email_id": email_id, "to": ["someone@example.com"], **data},
    }


def signed(
    body: bytes,
    *,
    svix_id: str | None = None,
    secret: str = WEBHOOK_SECRET,
    timestamp: datetime | None = None,
) -> dict[str, str]:
    """Headers signing ``body`` as Svix does."""
    svix_id = svix_id or "msg_" + os.urandom(12).hex()
    timestamp = timestamp or datetime.now(UTC)
    signature = Webhook(secret).sign(svix_id, timestamp, body.decode())
    return {
        "svix-id": svix_id,
        "svix-timestamp": str(int(timestamp.timestamp())),
        "svix-signature": signature,
        "content-type": "application/json",
    }


async def post_event(
    http: httpx.AsyncClient, payload: dict[str, Any], *, svix_id: str | None = None
) -> httpx.Response:
    """POST one signed event to /webhooks/resend."""
    body = orjson.dumps(payload)
    return await http.post("/webhooks/resend", content=body, headers=signed(body, svix_id=svix_id))
