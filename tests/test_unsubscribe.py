"""One-click unsubscribe over real HTTP: the /u/{token} routes served by uvicorn on a
free port, the real PostgreSQL, and messages sent by a real campaign."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from structlog.testing import capture_logs
from temporalio.client import Client

from campaigns.api.unsubscribe import ROUTES, SECURITY_HEADERS
from campaigns.models import CampaignState
from campaigns.settings import Settings
from campaigns.unsubscribe import UnsubscribeLinks, UnsubscribeTarget
from tests.conftest import TASK_QUEUE
from tests.helpers import (
    SimulatorControl,
    addresses,
    eventually,
    make_audience,
    make_org,
    make_spec,
    unique,
)
from workflows import CampaignWorkflow

ROOT = Path(__file__).resolve().parent.parent
ONE_CLICK = {"content-type": "application/x-www-form-urlencoded"}
ONE_CLICK_BODY = b"List-Unsubscribe=One-Click"


@pytest.fixture(scope="session")
def links(settings: Settings) -> UnsubscribeLinks:
    return UnsubscribeLinks.from_settings(settings)


@pytest.fixture(scope="session")
async def server_url(pool: asyncpg.Pool, links: UnsubscribeLinks) -> AsyncIterator[str]:
    """The routes in a minimal app, served by uvicorn on a port of their own."""
    app = Starlette(routes=ROUTES)
    app.state.pool = pool
    app.state.unsubscribe = links
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))

    async def started() -> bool:
        if task.done():
            task.result()  # raises what stopped it
        return server.started

    await eventually(started, what="the unsubscribe server to start", within=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
        sock.close()


@pytest.fixture
async def http(server_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server_url, timeout=10) as client:
        yield client


@dataclass
class Sent:
    """A campaign of an org that sent to ``emails``: ledger rows, no provider."""

    org: str
    campaign_id: str
    emails: list[str]
    ids: dict[str, int]


async def sent_campaign(
    pool: asyncpg.Pool, tmp_path: Path, count: int = 3, org_name: str | None = None
) -> Sent:
    org = await make_org(pool)
    if org_name is not None:
        await pool.execute("UPDATE orgs SET name = $2 WHERE id = $1", org, org_name)
    emails = addresses(unique("unsub"), count)
    _, report = await make_audience(pool, tmp_path, org, emails)
    campaign_id = unique("camp")
    await pool.execute(
        "INSERT INTO campaigns (id, org_id, audience_id, spec) VALUES ($1, $2, $3, '{}')",
        campaign_id,
        org,
        report.audience_id,
    )
    rows = await pool.fetch(
        "SELECT id, email FROM recipients WHERE audience_id = $1", report.audience_id
    )
    ids = {row["email"]: row["id"] for row in rows}
    await pool.executemany(
        """INSERT INTO deliveries (campaign_id, recipient_id, status, execution_id, round)
           VALUES ($1, $2, 'sent', 'run-1', 0)""",
        [(campaign_id, recipient_id) for recipient_id in ids.values()],
    )
    return Sent(org, campaign_id, emails, ids)


def path_of(links: UnsubscribeLinks, sent: Sent, email: str) -> str:
    return "/u/" + links.token(sent.org, sent.campaign_id, sent.ids[email])


async def suppression(pool: asyncpg.Pool, org: str, email: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT reason, campaign_id FROM suppressions WHERE org_id = $1 AND email = $2",
        org,
        email,
    )


async def unsubscribed_at(pool: asyncpg.Pool, sent: Sent, email: str):
    return await pool.fetchval(
        "SELECT unsubscribed_at FROM deliveries WHERE campaign_id = $1 AND recipient_id = $2",
        sent.campaign_id,
        sent.ids[email],
    )


async def counter(pool: asyncpg.Pool, campaign_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT org_id, unsubscribed FROM campaign_engagement WHERE campaign_id = $1",
        campaign_id,
    )


async def test_one_click_post_unsubscribes_at_once_and_a_second_post_changes_nothing(
    pool: asyncpg.Pool, http: httpx.AsyncClient, links: UnsubscribeLinks, tmp_path: Path
) -> None:
    sent = await sent_campaign(pool, tmp_path)
    email, other = sent.emails[0], sent.emails[1]
    path = path_of(links, sent, email)

    with capture_logs() as logged:
        first = await http.post(path, content=ONE_CLICK_BODY, headers=ONE_CLICK)

    assert first.status_code == 200
    assert "unsubscribed" in first.text.lower()
    row = await suppression(pool, sent.org, email)
    assert row is not None and dict(row) == {
        "reason": "unsubscribed",
        "campaign_id": sent.campaign_id,
    }
    marked = await unsubscribed_at(pool, sent, email)
    assert marked is not None
    count = await counter(pool, sent.campaign_id)
    assert count is not None and dict(count) == {"org_id": sent.org, "unsubscribed": 1}
    assert await suppression(pool, sent.org, other) is None  # only the token's recipient

    second = await http.post(path, content=ONE_CLICK_BODY, headers=ONE_CLICK)
    assert second.status_code == 200
    assert await unsubscribed_at(pool, sent, email) == marked  # the first one wins
    count = await counter(pool, sent.campaign_id)
    assert count is not None and count["unsubscribed"] == 1

    lines = [entry for entry in logged if entry["event"] == "unsubscribe request"]
    assert [(e["outcome"], e["org"], e["campaign_id"]) for e in lines] == [
        ("unsubscribed", sent.org, sent.campaign_id)
    ]
    text = repr(logged)
    assert email not in text and path.split("/")[-1] not in text


async def test_a_second_recipients_unsubscribe_counts_again(
    pool: asyncpg.Pool, http: httpx.AsyncClient, links: UnsubscribeLinks, tmp_path: Path
) -> None:
    sent = await sent_campaign(pool, tmp_path)
    for email in sent.emails[:2]:
        response = await http.post(
            path_of(links, sent, email), content=ONE_CLICK_BODY, headers=ONE_CLICK
        )
        assert response.status_code == 200
    count = await counter(pool, sent.campaign_id)
    assert count is not None and count["unsubscribed"] == 2


async def test_get_shows_the_page_and_never_unsubscribes(
    pool: asyncpg.Pool, http: httpx.AsyncClient, links: UnsubscribeLinks, tmp_path: Path
) -> None:
    sent = await sent_campaign(pool, tmp_path, org_name="<script>alert(1)</script> & Co")
    email = sent.emails[0]
    path = path_of(links, sent, email)

    for _ in range(3):  # a link scanner, a prefetcher, the reader
        page = await http.get(path)
        assert page.status_code == 200

    assert page.headers["content-type"].startswith("text/html")
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    assert page.headers["content-security-policy"] == (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
    )
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in page.text
    assert "<script>" not in page.text
    assert email not in page.text and f"{email[0]}***@example.com" in page.text
    assert '<form method="post">' in page.text
    assert 'name="List-Unsubscribe" value="One-Click"' in page.text
    assert not re.search(r"(src|href)=", page.text)  # no external resources
    assert await suppression(pool, sent.org, email) is None
    assert await unsubscribed_at(pool, sent, email) is None
    assert await counter(pool, sent.campaign_id) is None

    # The page's button posts the form to the same URL, as a browser does.
    confirmed = await http.post(
        path,
        data={"List-Unsubscribe": "One-Click"},
        headers={"accept": "text/html"},
    )
    assert confirmed.status_code == 200
    assert confirmed.headers["content-type"].startswith("text/html")
    assert (await suppression(pool, sent.org, email)) is not None
    again = await http.get(path)
    assert again.status_code == 200
    assert "no more mail" in again.text and "<form" not in again.text


async def test_a_confirm_field_and_a_multipart_body_also_unsubscribe(
    pool: asyncpg.Pool, http: httpx.AsyncClient, links: UnsubscribeLinks, tmp_path: Path
) -> None:
    sent = await sent_campaign(pool, tmp_path)
    confirm = await http.post(path_of(links, sent, sent.emails[0]), data={"confirm": "1"})
    multipart = await http.post(
        path_of(links, sent, sent.emails[1]), files={"List-Unsubscribe": (None, "One-Click")}
    )
    assert (confirm.status_code, multipart.status_code) == (200, 200)
    for email in sent.emails[:2]:
        assert await suppression(pool, sent.org, email) is not None


async def test_a_post_without_the_one_click_body_is_refused(
    pool: asyncpg.Pool, http: httpx.AsyncClient, links: UnsubscribeLinks, tmp_path: Path
) -> None:
    sent = await sent_campaign(pool, tmp_path)
    path = path_of(links, sent, sent.emails[0])
    for body in (b"", b"List-Unsubscribe=Yes", b"confirm=0", b"\xff\xfe"):
        response = await http.post(path, content=body, headers=ONE_CLICK)
        assert response.status_code == 400
        assert "List-Unsubscribe=One-Click" in response.json()["error"]
    assert await suppression(pool, sent.org, sent.emails[0]) is None


async def test_a_tampered_token_is_refused_without_echoing_it(
    pool: asyncpg.Pool, http: httpx.AsyncClient, links: UnsubscribeLinks, tmp_path: Path
) -> None:
    sent = await sent_campaign(pool, tmp_path)
    email = sent.emails[0]
    token = path_of(links, sent, email).split("/")[-1]
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BA")
    foreign = UnsubscribeLinks("https://x.example", "f" * 40).token(
        sent.org, sent.campaign_id, sent.ids[email]
    )

    for bad in (tampered, foreign, "v9.nothing", "x" * 600):
        page = await http.get(f"/u/{bad}")
        assert page.status_code == 400
        assert page.headers["content-type"].startswith("text/html")
        assert bad not in page.text
        posted = await http.post(f"/u/{bad}", content=ONE_CLICK_BODY, headers=ONE_CLICK)
        assert posted.status_code == 400
        assert "not valid" in posted.json()["error"] and bad not in posted.text
    assert await suppression(pool, sent.org, email) is None


async def test_a_deleted_org_answers_410_gone(
    pool: asyncpg.Pool, http: httpx.AsyncClient, links: UnsubscribeLinks, tmp_path: Path
) -> None:
    sent = await sent_campaign(pool, tmp_path)
    path = path_of(links, sent, sent.emails[0])
    await pool.execute("DELETE FROM campaigns WHERE org_id = $1", sent.org)
    await pool.execute("DELETE FROM orgs WHERE id = $1", sent.org)

    page = await http.get(path)
    posted = await http.post(path, content=ONE_CLICK_BODY, headers=ONE_CLICK)

    assert (page.status_code, posted.status_code) == (410, 410)
    assert "no longer exists" in page.text
    assert await counter(pool, sent.campaign_id) is None


async def test_a_recipient_outside_the_orgs_audiences_answers_404(
    pool: asyncpg.Pool, http: httpx.AsyncClient, links: UnsubscribeLinks, tmp_path: Path
) -> None:
    ours = await sent_campaign(pool, tmp_path)
    theirs = await sent_campaign(pool, tmp_path)
    victim = theirs.emails[0]
    # Correctly signed, but naming another org's recipient: never reaches their rows.
    path = "/u/" + links.token(ours.org, ours.campaign_id, theirs.ids[victim])
    missing = "/u/" + links.token(ours.org, ours.campaign_id, 2**62)

    for target in (path, missing):
        assert (await http.get(target)).status_code == 404
        posted = await http.post(target, content=ONE_CLICK_BODY, headers=ONE_CLICK)
        assert posted.status_code == 404
    assert await suppression(pool, theirs.org, victim) is None
    assert await suppression(pool, ours.org, victim) is None
    # Their campaign named with our org: refused too.
    cross = "/u/" + links.token(ours.org, theirs.campaign_id, ours.ids[ours.emails[0]])
    posted = await http.post(cross, content=ONE_CLICK_BODY, headers=ONE_CLICK)
    assert posted.status_code == 404
    assert await counter(pool, theirs.campaign_id) is None


async def test_a_body_over_1_kib_is_refused_with_413_however_it_is_sent(
    pool: asyncpg.Pool, http: httpx.AsyncClient, links: UnsubscribeLinks, tmp_path: Path
) -> None:
    sent = await sent_campaign(pool, tmp_path)
    path = path_of(links, sent, sent.emails[0])
    big = ONE_CLICK_BODY + b"&pad=" + b"x" * 1100

    declared = await http.post(path, content=big, headers=ONE_CLICK)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for start in range(0, len(big), 100):
            yield big[start : start + 100]

    chunked = await http.post(path, content=chunks(), headers=ONE_CLICK)
    assert (declared.status_code, chunked.status_code) == (413, 413)
    assert "1024 bytes" in declared.json()["error"]
    assert await suppression(pool, sent.org, sent.emails[0]) is None
    # Exactly at the limit is fine.
    padded = ONE_CLICK_BODY + b"&pad=" + b"x" * (1024 - len(ONE_CLICK_BODY) - 5)
    assert len(padded) == 1024
    assert (await http.post(path, content=padded, headers=ONE_CLICK)).status_code == 200


async def test_an_address_suppressed_for_a_bounce_keeps_its_reason(
    pool: asyncpg.Pool, http: httpx.AsyncClient, links: UnsubscribeLinks, tmp_path: Path
) -> None:
    sent = await sent_campaign(pool, tmp_path)
    email = sent.emails[0]
    await pool.execute(
        "INSERT INTO suppressions (org_id, email, reason) VALUES ($1, $2, 'bounced')",
        sent.org,
        email,
    )
    posted = await http.post(path_of(links, sent, email), content=ONE_CLICK_BODY)
    assert posted.status_code == 200
    row = await suppression(pool, sent.org, email)
    assert row is not None and row["reason"] == "bounced"
    assert await unsubscribed_at(pool, sent, email) is not None
    count = await counter(pool, sent.campaign_id)
    assert count is not None and count["unsubscribed"] == 1


async def test_a_campaign_whose_row_is_gone_still_unsubscribes_from_the_org(
    pool: asyncpg.Pool, http: httpx.AsyncClient, links: UnsubscribeLinks, tmp_path: Path
) -> None:
    sent = await sent_campaign(pool, tmp_path)
    email = sent.emails[0]
    await pool.execute("DELETE FROM campaigns WHERE id = $1", sent.campaign_id)

    posted = await http.post(path_of(links, sent, email), content=ONE_CLICK_BODY)

    assert posted.status_code == 200
    row = await suppression(pool, sent.org, email)
    assert row is not None and dict(row) == {"reason": "unsubscribed", "campaign_id": None}
    assert await counter(pool, sent.campaign_id) is None


async def test_concurrent_one_click_posts_count_once(
    pool: asyncpg.Pool, http: httpx.AsyncClient, links: UnsubscribeLinks, tmp_path: Path
) -> None:
    sent = await sent_campaign(pool, tmp_path)
    path = path_of(links, sent, sent.emails[0])
    answers = await asyncio.gather(
        *(http.post(path, content=ONE_CLICK_BODY, headers=ONE_CLICK) for _ in range(8))
    )
    assert {answer.status_code for answer in answers} == {200}
    count = await counter(pool, sent.campaign_id)
    assert count is not None and count["unsubscribed"] == 1


@pytest.mark.usefixtures("worker")
async def test_every_message_of_a_campaign_carries_a_one_click_link_to_its_recipient(
    client: Client,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    http: httpx.AsyncClient,
    links: UnsubscribeLinks,
    settings: Settings,
    tmp_path: Path,
) -> None:
    org = await make_org(pool)
    emails = addresses(unique("e2e-unsub"), 60)
    audience, report = await make_audience(pool, tmp_path, org, emails)
    spec = make_spec(
        org,
        audience,
        subject="News for {{ name }}",
        html=(
            '<p>Hi {{ name }}, <a href="https://acme.example/sale">sale</a>.</p>'
            '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'
        ),
        text="Hi {{ name }}. Unsubscribe: {{ unsubscribe_url }}",
    )
    handle = await client.start_workflow(
        CampaignWorkflow.run, spec, id=spec.campaign_id, task_queue=TASK_QUEUE
    )
    result = await handle.result()
    assert result.state is CampaignState.COMPLETED and result.counts.sent == 60

    ids = {
        row["email"]: row["id"]
        for row in await pool.fetch(
            "SELECT id, email FROM recipients WHERE audience_id = $1", report.audience_id
        )
    }
    messages = await sim.messages("")
    assert sorted(message["to"][0] for message in messages) == sorted(emails)
    base = settings.unsubscribe_base_url
    link = re.compile(rf"^<{re.escape(base or '')}/u/([A-Za-z0-9._-]+)>$")
    for message in messages:
        to = message["to"][0]
        headers = message["headers"]
        assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        match = link.match(headers["List-Unsubscribe"])
        assert match, headers["List-Unsubscribe"]
        token = match[1]
        assert links.verify(token) == UnsubscribeTarget(org, spec.campaign_id, ids[to])
        url = f"{base}/u/{token}"
        # Straight to the unsubscribe page; the other link goes through click tracking.
        assert f'<a href="{url}">Unsubscribe</a>' in message["html"]
        assert "acme.example%2Fsale" in message["html"]
        assert message["text"].endswith(f"Unsubscribe: {url}")
        assert to not in token

    # The link of a sent message unsubscribes its recipient, over HTTP.
    first = next(m for m in messages if m["to"][0] == emails[0])
    token = link.match(first["headers"]["List-Unsubscribe"])[1]  # type: ignore[index]
    posted = await http.post(f"/u/{token}", content=ONE_CLICK_BODY, headers=ONE_CLICK)
    assert posted.status_code == 200
    row = await suppression(pool, org, emails[0])
    assert row is not None and row["campaign_id"] == spec.campaign_id
    count = await counter(pool, spec.campaign_id)
    assert count is not None and count["unsubscribed"] == 1


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "UNSUBSCRIBE_BASE_URL"),
        ({"UNSUBSCRIBE_BASE_URL": "https://u.example"}, "UNSUBSCRIBE_SECRET"),
        (
            {"UNSUBSCRIBE_BASE_URL": "https://u.example", "UNSUBSCRIBE_SECRET": "too-short-1"},
            "UNSUBSCRIBE_SECRET",
        ),
        (
            {"UNSUBSCRIBE_BASE_URL": "u.example", "UNSUBSCRIBE_SECRET": "k" * 40},
            "UNSUBSCRIBE_BASE_URL",
        ),
    ],
)
async def test_a_worker_without_unsubscribe_settings_exits_2_naming_the_variable(
    settings: Settings, tmp_path: Path, env: dict[str, str], named: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UNSUBSCRIBE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "worker.py",
        cwd=ROOT,
        env={
            **clean,
            **env,
            "DATABASE_URL": settings.database_url or "",
            "PROVIDER_BASE_URL": settings.provider_base_url or "",
            "PROVIDER_API_KEY": "re_unused",
            "CAMPAIGNS_DATA_DIR": str(tmp_path),  # no local stack's settings
            "LOG_FORMAT": "json",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    output = (stdout + stderr).decode()
    assert process.returncode == 2, output
    assert "worker cannot start" in output and named in output
    assert "too-short-1" not in output and "k" * 40 not in output
    assert "Traceback" not in output
