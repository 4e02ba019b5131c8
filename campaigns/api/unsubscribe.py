"""``GET /u/{token}`` and ``POST /u/{token}``: the links in every message's
``List-Unsubscribe`` header and ``{{ unsubscribe_url }}``.

* ``POST`` with ``List-Unsubscribe=One-Click`` (RFC 8058, sent by mailbox providers,
  form-urlencoded or multipart) unsubscribes at once: no cookie, login or
  confirmation. The page's button posts the same body.
* ``GET`` never unsubscribes (link scanners and prefetchers follow links): it shows a
  small page naming the org, with a button that posts to the same URL.

The app provides ``app.state.pool`` (asyncpg) and ``app.state.unsubscribe``
(``UnsubscribeLinks``). One log line per request: the outcome, org and campaign;
never the address or the token.
"""

from __future__ import annotations

import asyncio
import html
import time
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import parse_qs

import asyncpg
import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from campaigns.store import unsubscribes
from campaigns.store.unsubscribes import UnsubscribeResult, UnsubscribeView
from campaigns.unsubscribe import (
    InvalidToken,
    UnsubscribeLinks,
    UnsubscribeTarget,
    one_click_requested,
)

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 1024
"""A one-click body is 26 bytes; anything past this is refused with 413."""
DATABASE_TIMEOUT_SECONDS = 10.0
"""The longest a request waits for the database (a connection and its statements)."""

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}

_STATUS = {
    UnsubscribeResult.UNSUBSCRIBED: 200,
    UnsubscribeResult.ALREADY: 200,
    UnsubscribeResult.UNKNOWN_RECIPIENT: 404,
    UnsubscribeResult.UNKNOWN_ORG: 410,
}
_MESSAGES = {
    "invalid_token": "This unsubscribe link is not valid. Use the link from the message itself.",
    "unknown_recipient": "This unsubscribe link names no one we send to.",
    "unknown_org": "The sender of this message no longer exists: it sends no more mail.",
    "too_large": f"The request body is larger than {MAX_BODY_BYTES} bytes.",
    "not_one_click": "The body must be List-Unsubscribe=One-Click (RFC 8058).",
    "unavailable": "The service is busy; please try again in a minute.",
}
_TITLES = {
    "invalid_token": "Invalid link",
    "unknown_recipient": "Unknown link",
    "unknown_org": "Sender gone",
    "too_large": "Request too large",
    "not_one_click": "Bad request",
    "unavailable": "Try again",
}
# What waiting can cure: a database that is down, restarting or saturated.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 32rem; margin: 4rem auto;
       padding: 0 1rem; color: #222; line-height: 1.5; }}
button {{ font-size: 1rem; padding: .6rem 1.2rem; cursor: pointer; }}
.muted {{ color: #666; }}
</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""


def _page(title: str, body: str, status: int = 200) -> Response:
    text = _PAGE.format(title=html.escape(title), body=body)
    return Response(text, status, headers=SECURITY_HEADERS, media_type="text/html")


def _message_page(code: str, status: int) -> Response:
    return _page(_TITLES[code], f"<p>{html.escape(_MESSAGES[code])}</p>", status)


def _confirm_page(view: UnsubscribeView) -> Response:
    org = html.escape(view.org_name)
    who = html.escape(view.masked_email)
    if view.unsubscribed:
        return _page(
            "Unsubscribed", f"<p>{who} receives no more mail from <strong>{org}</strong>.</p>"
        )
    # No action attribute: the form posts to this very URL.
    body = (
        f"<p>Stop mail from <strong>{org}</strong> to {who}?</p>"
        '<form method="post">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Unsubscribe</button></form>'
        '<p class="muted">Nothing changes until you press the button.</p>'
    )
    return _page("Unsubscribe", body)


def _done_page() -> Response:
    return _page("Unsubscribed", "<p>You are unsubscribed: you will receive no more mail.</p>")


def _post_error(request: Request, code: str, status: int) -> Response:
    """HTML for a browser (the page's button), JSON for a mailbox provider."""
    if "text/html" in request.headers.get("accept", ""):
        return _message_page(code, status)
    return JSONResponse({"error": _MESSAGES[code]}, status, headers=SECURITY_HEADERS)


def _links(request: Request) -> UnsubscribeLinks:
    links: UnsubscribeLinks = request.app.state.unsubscribe
    return links


def _target(request: Request) -> UnsubscribeTarget | InvalidToken:
    try:
        return _links(request).verify(request.path_params["token"])
    except InvalidToken as error:
        return error


async def _bounded_body(request: Request) -> bytes | None:
    """The body, or None when it is larger than ``MAX_BODY_BYTES`` (however it is sent)."""
    declared = request.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return None
    return bytes(body)


def _form(content_type: str, body: bytes) -> dict[str, list[str]]:
    """The fields of a form-urlencoded or multipart/form-data body (already bounded)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
        message = BytesParser(policy=HTTP).parsebytes(head + body)
        fields: dict[str, list[str]] = {}
        if message.is_multipart():
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if isinstance(name, str) and isinstance(payload, bytes):
                    value = payload.decode("utf-8", "replace").strip()
                    fields.setdefault(name, []).append(value)
        return fields
    # RFC 8058 names form-urlencoded; a body sent without a type is read the same way.
    text = body.decode("utf-8", "replace").strip()
    return parse_qs(text, keep_blank_values=True, max_num_fields=20)


def _log(request: Request, outcome: str, started: float, **fields: object) -> None:
    log.info(
        "unsubscribe request",
        method=request.method,
        outcome=outcome,
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
        **fields,
    )


def _ids(target: UnsubscribeTarget) -> dict[str, object]:
    return {"org": target.org, "campaign_id": target.campaign_id}


async def show(request: Request) -> Response:
    """``GET /u/{token}``: the confirmation page; never unsubscribes."""
    started = time.perf_counter()
    target = _target(request)
    if isinstance(target, InvalidToken):
        _log(request, "invalid_token", started, reason=target.reason)
        return _message_page("invalid_token", 400)
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT_SECONDS):
            view = await unsubscribes.describe(request.app.state.pool, target)
    except _UNAVAILABLE as error:
        _log(request, "unavailable", started, error=type(error).__name__, **_ids(target))
        return _message_page("unavailable", 503)
    if isinstance(view, UnsubscribeResult):
        _log(request, view.value, started, **_ids(target))
        return _message_page(view.value, _STATUS[view])
    _log(request, "shown", started, already=view.unsubscribed, **_ids(target))
    return _confirm_page(view)


async def one_click(request: Request) -> Response:
    """``POST /u/{token}``: unsubscribe at once (RFC 8058 one-click, or the page's button)."""
    started = time.perf_counter()
    target = _target(request)
    if isinstance(target, InvalidToken):
        _log(request, "invalid_token", started, reason=target.reason)
        return _post_error(request, "invalid_token", 400)
    try:
        body = await _bounded_body(request)
    except ClientDisconnect:
        _log(request, "client_disconnected", started, **_ids(target))
        return Response(status_code=400)
    if body is None:
        _log(request, "too_large", started, **_ids(target))
        return _post_error(request, "too_large", 413)
    if not one_click_requested(_form(request.headers.get("content-type", ""), body)):
        _log(request, "not_one_click", started, **_ids(target))
        return _post_error(request, "not_one_click", 400)
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT_SECONDS):
            result = await unsubscribes.unsubscribe(request.app.state.pool, target)
    except _UNAVAILABLE as error:
        _log(request, "unavailable", started, error=type(error).__name__, **_ids(target))
        response = _post_error(request, "unavailable", 503)
        response.headers["Retry-After"] = "60"
        return response
    _log(request, result.value, started, **_ids(target))
    if result in (UnsubscribeResult.UNKNOWN_ORG, UnsubscribeResult.UNKNOWN_RECIPIENT):
        return _post_error(request, result.value, _STATUS[result])
    return _done_page()


ROUTES: list[Route] = [
    Route("/u/{token}", show, methods=["GET"], name="unsubscribe_page"),
    Route("/u/{token}", one_click, methods=["POST"], name="unsubscribe_one_click"),
]
"""Mount these in the HTTP service's app (it sets ``app.state.pool`` and ``.unsubscribe``)."""
