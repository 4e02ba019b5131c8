"""``POST /webhooks/resend``: the provider's signed events, durable before 2xx.

Answers: 200 once the event is committed (``{"stored": true}``, or ``"duplicate":
true`` for an svix-id already stored); 401 for a missing, wrong or stale signature;
400 for a body that is not an event (naming the field); 413 over the size limit; 503
when webhooks are not configured, the database cannot commit, or too many events wait
(the provider retries). Refusals are logged with their reason, never the body.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from campaigns.api._ingest import Ingester, Overloaded
from campaigns.api._resend_events import Refused, SignatureCheck, parse

log = structlog.get_logger("api.webhooks")

COMMIT_WAIT_SECONDS = 10.0
"""The longest a request waits for its commit before answering 503."""


def _refuse(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    log.info("webhook refused", status=status, reason=code)
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


async def resend(request: Request) -> Response:
    """Verify, store (group commit) and acknowledge one event."""
    signature: SignatureCheck | None = request.app.state.signature
    if signature is None:
        return _refuse(503, "webhooks_disabled", "webhooks are not configured (WEBHOOK_SECRET)")
    body = await request.body()
    now = datetime.now(UTC)
    try:
        svix_id = signature.verify(body, dict(request.headers), now=now)
        event = parse(svix_id, body, now=now)
    except Refused as refused:
        return _refuse(refused.status, refused.code, refused.message)
    ingester: Ingester = request.app.state.ingester
    try:
        is_new = await asyncio.wait_for(ingester.submit(event), timeout=COMMIT_WAIT_SECONDS)
    except Overloaded as exc:
        return _refuse(503, "overloaded", str(exc), **{"Retry-After": "5"})
    except TimeoutError:
        return _refuse(503, "not_stored", "the event could not be stored in time; retry")
    except Exception as exc:
        return _refuse(503, "not_stored", f"the event could not be stored ({type(exc).__name__})")
    if event.outcome == "ignored":
        return JSONResponse({"stored": True, "duplicate": not is_new, "ignored": True})
    return JSONResponse({"stored": True, "duplicate": not is_new})
