"""POST /webhooks/resend over real HTTP: signatures, durability, duplicates, and what
events do to the ledger and the suppression lists (real PostgreSQL, real campaigns)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from temporalio.client import Client

from campaigns.models import CampaignSpec, CampaignState
from campaigns.settings import Settings
from tests.api_support import event, post_event, serve_api, signed
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


@pytest.fixture
async def api(settings: Settings) -> Any:
    async with serve_api(settings) as url, httpx.AsyncClient(base_url=url) as http:
        yield http


async def stored(pool: asyncpg.Pool, svix_id: str) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM webhook_events WHERE svix_id = $1", svix_id)


async def test_a_signed_event_is_stored_before_it_is_acknowledged(
    api: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    svix_id = unique("msg")
    response = await post_event(api, event("email.delivered", unique("id")), svix_id=svix_id)
    assert response.status_code == 200, response.text
    assert response.json() == {"stored": True, "duplicate": False}
    # Committed by the time the answer left: no polling needed.
    assert len(await stored(pool, svix_id)) == 1


@pytest.mark.parametrize(
    "tamper, reason",
    [
        ("wrong_secret", "bad_signature"),
        ("stale", "stale_timestamp"),
        ("ahead", "stale_timestamp"),
        ("body_changed", "bad_signature"),
        ("no_signature", "missing_signature"),
        ("garbage_signature", "bad_signature"),
        ("bad_base64", "bad_signature"),
        ("timestamp_not_a_number", "bad_timestamp"),
        ("svix_id_with_spaces", "bad_svix_id"),
    ],
)
async def test_signatures_that_do_not_hold_are_refused_and_nothing_is_stored(
    api: httpx.AsyncClient, pool: asyncpg.Pool, tamper: str, reason: str
) -> None:
    body = orjson.dumps(event("email.delivered", unique("id")))
    svix_id = unique("msg")
    headers = signed(body, svix_id=svix_id)
    now = datetime.now(UTC)
    if tamper == "wrong_secret":
        headers = signed(body, svix_id=svix_id, secret="whsec_" + "QUJD" * 8)
    elif tamper == "stale":
        headers = signed(body, svix_id=svix_id, timestamp=now - timedelta(minutes=6))
    elif tamper == "ahead":
        headers = signed(body, svix_id=svix_id, timestamp=now + timedelta(minutes=6))
    elif tamper == "body_changed":
        body = body.replace(b"delivered", b"complained")
    elif tamper == "no_signature":
        del headers["svix-signature"]
    elif tamper == "garbage_signature":
        headers["svix-signature"] = "v1"  # no comma: the verifier must not crash
    elif tamper == "bad_base64":
        headers["svix-signature"] = "v1,!!!not base64!!!"
    elif tamper == "timestamp_not_a_number":
        headers["svix-timestamp"] = "nan"
    elif tamper == "svix_id_with_spaces":
        headers["svix-id"] = "msg a; DROP"
    response = await api.post("/webhooks/resend", content=body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == reason
    assert await stored(pool, svix_id) == []


async def test_the_same_svix_id_twice_is_stored_once(
    api: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    svix_id = unique("msg")
    payload = event("email.opened", unique("id"))
    first = await post_event(api, payload, svix_id=svix_id)
    again = await post_event(api, payload, svix_id=svix_id)
    assert first.json()["duplicate"] is False
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert len(await stored(pool, svix_id)) == 1


async def test_bodies_that_are_not_events_are_refused_naming_the_field(
    api: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    recent = (datetime.now(UTC) - timedelta(hours=1)).isoformat().encode()
    cases = {
        b"{not json": (400, "bad_json"),
        b"[1, 2]": (400, "bad_json"),
        b'{"type": 7}': (400, "bad_type"),
        b'{"type": "email.bounced", "created_at": "' + recent + b'"}': (400, "bad_data"),
        b'{"type": "email.bounced", "created_at": "yesterday", "data": {"email_id": "x"}}': (
            400,
            "bad_created_at",
        ),
        b'{"type": "email.opened", "created_at": "' + recent + b'", "data": {"email_id": "a b"}}': (
            400,
            "bad_email_id",
        ),
    }
    for body, (status, code) in cases.items():
        svix_id = unique("msg")
        response = await api.post(
            "/webhooks/resend", content=body, headers=signed(body, svix_id=svix_id)
        )
        assert (response.status_code, response.json()["error"]) == (status, code), body
        assert "must" in response.json()["message"] or "JSON" in response.json()["message"]
        assert await stored(pool, svix_id) == []


async def test_an_unknown_type_is_stored_and_ignored(
    api: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    svix_id = unique("msg")
    body = orjson.dumps({"type": "contact.created", "data": {"id": "c1", "note": "a\u0000b"}})
    response = await api.post(
        "/webhooks/resend", content=body, headers=signed(body, svix_id=svix_id)
    )
    assert response.status_code == 200
    assert response.json() == {"stored": True, "duplicate": False, "ignored": True}
    [row] = await stored(pool, svix_id)
    assert row["outcome"] == "ignored" and row["applied_at"] is not None


async def test_a_body_over_the_limit_is_refused_with_413(api: httpx.AsyncClient) -> None:
    body = b'{"type": "email.opened", "pad": "' + b"x" * 300_000 + b'"}'
    response = await api.post("/webhooks/resend", content=body, headers=signed(body))
    assert response.status_code == 413
    assert "262144 bytes" in response.json()["message"]

    async def chunks() -> Any:  # no Content-Length: counted as it is read
        for _ in range(40):
            yield b"x" * 10_000

    response = await api.post("/webhooks/resend", content=chunks(), headers=signed(b"x"))
    assert response.status_code == 413


async def test_health_and_readiness(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"ok": True}
    ready = (await api.get("/readyz")).json()
    assert ready["database"] == "ok" and ready["webhooks"] is True
    missing = await api.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    wrong_method = await api.get("/webhooks/resend")
    assert wrong_method.status_code == 405


async def test_without_a_database_events_are_refused_with_503_not_acknowledged(
    settings: Settings,
) -> None:
    async with (
        serve_api(settings, database_url="postgresql://postgres@127.0.0.1:1/none") as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 503
        response = await post_event(http, event("email.delivered", "id-1"))
        assert response.status_code == 503 and response.json()["error"] == "not_stored"


async def test_webhooks_without_a_secret_are_refused_with_a_reason(settings: Settings) -> None:
    async with (
        serve_api(settings, webhook_secret=None) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        response = await post_event(http, event("email.delivered", "id-1"))
        assert response.status_code == 503
        assert "WEBHOOK_SECRET" in response.json()["message"]


# -- what events do -------------------------------------------------------------------


async def sent_campaign(
    client: Client, pool: asyncpg.Pool, tmp_path: Path, org: str, audience: str
) -> tuple[CampaignSpec, dict[str, str]]:
    """Run a campaign to the end; return its spec and address -> provider message id."""
    spec = make_spec(org, audience)
    handle = await client.start_workflow(
        CampaignWorkflow.run, spec, id=spec.campaign_id, task_queue=TASK_QUEUE
    )
    assert (await handle.result()).state is CampaignState.COMPLETED
    rows = await pool.fetch(
        """SELECT r.email, d.provider_message_id FROM deliveries d
           JOIN recipients r ON r.id = d.recipient_id
           WHERE d.campaign_id = $1 AND d.status = 'sent'""",
        spec.campaign_id,
    )
    return spec, {row["email"]: row["provider_message_id"] for row in rows}


async def suppressions(pool: asyncpg.Pool, org: str) -> dict[str, tuple[str, str | None]]:
    rows = await pool.fetch(
        "SELECT email, reason, campaign_id FROM suppressions WHERE org_id = $1", org
    )
    return {row["email"]: (row["reason"], row["campaign_id"]) for row in rows}


async def delivery(pool: asyncpg.Pool, campaign_id: str, email: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        """SELECT d.* FROM deliveries d JOIN recipients r ON r.id = d.recipient_id
           WHERE d.campaign_id = $1 AND r.email = $2""",
        campaign_id,
        email,
    )
    assert row is not None
    return row


async def engagement(pool: asyncpg.Pool, campaign_id: str) -> dict[str, int]:
    row = await pool.fetchrow(
        "SELECT * FROM campaign_engagement WHERE campaign_id = $1", campaign_id
    )
    return {k: v for k, v in dict(row or {}).items() if isinstance(v, int)}


@pytest.mark.usefixtures("worker")
async def test_a_hard_bounce_and_a_complaint_suppress_and_the_next_campaign_skips_them(
    api: httpx.AsyncClient,
    client: Client,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
) -> None:
    org = await make_org(pool)
    emails = addresses(unique("rep"), 40)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    first, ids = await sent_campaign(client, pool, tmp_path, org, audience)
    bounced, complained, soft = emails[0], emails[1], emails[2]
    bounce = {"type": "Permanent", "subType": "General", "message": "no such user"}
    for payload in (
        event("email.delivered", ids[complained]),
        event("email.bounced", ids[bounced], bounce=bounce),
        event("email.complained", ids[complained]),
        event("email.bounced", ids[soft], bounce={**bounce, "type": "Transient"}),
    ):
        assert (await post_event(api, payload)).status_code == 200

    found = await eventually(
        lambda: suppressions(pool, org), lambda s: len(s) >= 2, what="two suppressions"
    )
    assert found == {
        bounced: ("bounced", first.campaign_id),
        complained: ("complained", first.campaign_id),
    }
    row = await delivery(pool, first.campaign_id, bounced)
    assert row["bounce_type"] == "hard" and row["bounced_at"] is not None
    assert (await delivery(pool, first.campaign_id, soft))["soft_bounces"] == 1
    counts = await engagement(pool, first.campaign_id)
    assert (counts["hard_bounced"], counts["soft_bounced"], counts["complained"]) == (1, 1, 1)
    assert counts["delivered"] == 1

    await sim.reset()
    second, second_ids = await sent_campaign(client, pool, tmp_path, org, audience)
    assert bounced not in second_ids and complained not in second_ids
    assert soft in second_ids  # one soft bounce is not enough
    delivered = await sim.deliveries()
    assert bounced not in delivered and complained not in delivered
    status = await pool.fetchval(
        """SELECT d.status::text FROM deliveries d JOIN recipients r ON r.id = d.recipient_id
           WHERE d.campaign_id = $1 AND r.email = $2""",
        second.campaign_id,
        bounced,
    )
    assert status == "suppressed"


@pytest.mark.usefixtures("worker")
async def test_soft_bounces_in_a_row_suppress_and_a_delivery_resets_the_streak(
    api: httpx.AsyncClient,
    client: Client,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
) -> None:
    org = await make_org(pool)
    emails = addresses(unique("soft"), 4)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    runs = [await sent_campaign(client, pool, tmp_path, org, audience) for _ in range(3)]
    streaky, reset = emails[0], emails[1]
    transient = {"type": "Transient", "subType": "MailboxFull", "message": "full"}
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(microsecond=0)

    def at(minutes: int) -> str:
        return (start + timedelta(minutes=minutes)).isoformat()

    payloads = [
        event("email.bounced", ids[streaky], at=at(n), bounce=transient)
        for n, (_spec, ids) in enumerate(runs)
    ]
    # reset: soft, soft, delivered (later than both), soft: the streak is 1, not 3.
    (_, ids0), (_, ids1), (_, ids2) = runs
    payloads += [
        event("email.bounced", ids0[reset], at=at(0), bounce=transient),
        event("email.bounced", ids1[reset], at=at(1), bounce=transient),
        event("email.delivered", ids1[reset], at=at(2)),
        event("email.bounced", ids2[reset], at=at(3), bounce=transient),
    ]
    svix_ids = [f"msg_{unique('streak')}" for _ in payloads]
    for payload, svix_id in zip(payloads, svix_ids, strict=True):
        assert (await post_event(api, payload, svix_id=svix_id)).status_code == 200
    # The streak reads 1 after the first soft bounce as well: read it once all are applied.
    await eventually(
        lambda: pool.fetchval(
            "SELECT count(*) FROM webhook_events"
            " WHERE svix_id = ANY($1) AND applied_at IS NOT NULL",
            svix_ids,
        ),
        lambda applied: applied == len(svix_ids),
        what="every event applied",
    )

    found = await suppressions(pool, org)
    streak = await pool.fetchval(
        "SELECT soft_in_a_row FROM bounce_streaks WHERE org_id = $1 AND email = $2", org, reset
    )
    assert streak == 1
    assert found == {streaky: ("bounced", runs[2][0].campaign_id)}
    assert [(await engagement(pool, spec.campaign_id))["soft_bounced"] for spec, _ in runs] == [
        2,
        2,
        2,
    ]


@pytest.mark.usefixtures("worker")
async def test_events_out_of_order_end_in_the_right_state(
    api: httpx.AsyncClient,
    client: Client,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
) -> None:
    org = await make_org(pool)
    emails = addresses(unique("order"), 3)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    spec, ids = await sent_campaign(client, pool, tmp_path, org, audience)
    t0 = (datetime.now(UTC) - timedelta(hours=3)).replace(microsecond=0)

    def at(seconds: int) -> str:
        return (t0 + timedelta(seconds=seconds)).isoformat()

    opened_first, bounced_then_delivered = emails[0], emails[1]
    # Opened (and opened again, clicked) before "delivered" arrives.
    for payload in (
        event("email.opened", ids[opened_first], at=at(30)),
        event("email.clicked", ids[opened_first], at=at(40)),
        event("email.opened", ids[opened_first], at=at(20)),
        event("email.delivered", ids[opened_first], at=at(10)),
        # A late delivery never undoes a hard bounce.
        event(
            "email.bounced", ids[bounced_then_delivered], at=at(50), bounce={"type": "Permanent"}
        ),
        event("email.delivered", ids[bounced_then_delivered], at=at(45)),
    ):
        assert (await post_event(api, payload)).status_code == 200

    async def probe() -> asyncpg.Record:
        return await delivery(pool, spec.campaign_id, bounced_then_delivered)

    await eventually(probe, lambda row: row["delivered_at"] is not None, what="applied")
    first = await eventually(
        lambda: delivery(pool, spec.campaign_id, opened_first),
        lambda row: row["opens"] == 2 and row["delivered_at"] is not None,
        what="opens applied",
    )
    assert first["opened_at"] == t0 + timedelta(seconds=20)  # the earliest open
    assert first["delivered_at"] == t0 + timedelta(seconds=10)
    assert (first["clicks"], first["clicked_at"]) == (1, t0 + timedelta(seconds=40))
    second = await probe()
    assert second["bounce_type"] == "hard"
    assert second["bounced_at"] == t0 + timedelta(seconds=50)
    counts = await engagement(pool, spec.campaign_id)
    assert (counts["opened"], counts["clicked"], counts["delivered"]) == (1, 1, 2)
    assert (await suppressions(pool, org))[bounced_then_delivered][0] == "bounced"


async def record_sent(pool: asyncpg.Pool, org: str, campaign_id: str, message_id: str) -> None:
    """Record, as a batch would, that the org's one recipient was sent ``message_id``."""
    audience_id, recipient_id = await pool.fetchrow(
        """SELECT a.id, r.id FROM audiences a JOIN recipients r ON r.audience_id = a.id
           WHERE a.org_id = $1""",
        org,
    )
    await pool.execute(
        "INSERT INTO campaigns (id, org_id, audience_id, spec) VALUES ($1, $2, $3, '{}')",
        campaign_id,
        org,
        audience_id,
    )
    await pool.execute(
        """INSERT INTO deliveries (campaign_id, recipient_id, status, execution_id, round,
                                   provider_message_id) VALUES ($1, $2, 'sent', 'e', 0, $3)""",
        campaign_id,
        recipient_id,
        message_id,
    )


async def test_an_event_for_a_message_not_recorded_yet_waits_then_applies(
    api: httpx.AsyncClient, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, ["late@example.com"])
    campaign_id, message_id = unique("camp"), unique("late")
    svix_id = unique("msg")
    assert (
        await post_event(api, event("email.delivered", message_id), svix_id=svix_id)
    ).status_code == 200
    await eventually(
        lambda: stored(pool, svix_id), lambda rows: rows[0]["attempts"] >= 1, what="a try"
    )
    [row] = await stored(pool, svix_id)
    assert row["applied_at"] is None  # kept, to be tried again
    ready = (await api.get("/readyz")).json()
    assert ready["stored"]["stored"] >= 1
    assert ready["applied"]["waiting_for_their_message"] >= 1
    assert ready["events_waiting_to_apply"]["waiting"] >= 1
    # The batch that sent it records now.
    await record_sent(pool, org, campaign_id, message_id)
    applied = await eventually(
        lambda: stored(pool, svix_id),
        lambda rows: rows[0]["outcome"] == "applied",
        what="applied",
        within=20,
    )
    assert applied[0]["attempts"] >= 2
    assert (await engagement(pool, campaign_id))["delivered"] == 1


async def test_dates_the_ledger_cannot_keep_are_refused(api: httpx.AsyncClient) -> None:
    for created_at in ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00+14:00", "2020-01-01T00:00Z"):
        payload = event("email.opened", unique("id"), at=created_at)
        response = await post_event(api, payload)
        assert response.status_code == 400, created_at
        assert response.json()["error"] == "bad_created_at"


async def test_a_value_the_database_refuses_costs_only_its_own_event(
    api: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    import asyncio

    bad = b'{"type": "contact.updated", "x": 1e-20000}'
    good = [unique("msg") for _ in range(40)]

    async def post_good(svix_id: str) -> httpx.Response:
        return await post_event(api, event("email.opened", unique("id")), svix_id=svix_id)

    answers = await asyncio.gather(
        api.post("/webhooks/resend", content=bad, headers=signed(bad)),
        *(post_good(svix_id) for svix_id in good),
    )
    assert answers[0].status_code == 400 and answers[0].json()["error"] == "unstorable_value"
    assert [a.status_code for a in answers[1:]] == [200] * len(good)
    count = await pool.fetchval(
        "SELECT count(*) FROM webhook_events WHERE svix_id = ANY($1::text[])", good
    )
    assert count == len(good)


async def test_an_event_the_rules_cannot_take_is_set_aside_and_the_rest_applied(
    api: httpx.AsyncClient, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # A row no request could store any more (a date out of range), as older code might
    # have left it: it must not hold up the events after it.
    poison = unique("msg")
    await pool.execute(
        """INSERT INTO webhook_events (svix_id, type, email_id, occurred_at, payload)
           VALUES ($1, 'email.opened', 'm-poison', '-infinity', '{}')""",
        poison,
    )
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, ["after@example.com"])
    campaign_id = unique("camp")
    await record_sent(pool, org, campaign_id, unique("m"))
    # Its message was opened before: comparing the two times fails, even alone.
    await pool.execute(
        "UPDATE deliveries SET provider_message_id = 'm-poison', opened_at = now() "
        "WHERE campaign_id = $1",
        campaign_id,
    )
    assert (await post_event(api, event("email.delivered", "m-poison"))).status_code == 200
    await eventually(
        lambda: pool.fetchval(
            "SELECT delivered_at FROM deliveries WHERE campaign_id = $1", campaign_id
        ),
        lambda at: at is not None,
        what="the event after the poisoned one applied",
    )
    row = await pool.fetchrow("SELECT * FROM webhook_events WHERE svix_id = $1", poison)
    assert row["applied_at"] is None and row["next_try_at"] > row["received_at"]
    ready = (await api.get("/readyz")).json()
    assert ready["applied"]["set_aside"] >= 1
    await pool.execute("DELETE FROM webhook_events WHERE svix_id = $1", poison)


async def test_huge_headers_are_refused_and_tokens_never_echoed(api: httpx.AsyncClient) -> None:
    response = await api.post("/webhooks/resend", content=b"{}", headers={"x-pad": "a" * 20_000})
    assert response.status_code == 431
    assert response.json()["error"] == "headers_too_large"
    token = "v1.c2VjcmV0LXRva2VuLWhlcmU"
    for path in (f"/u/{token}/extra", f"/u/{token}/"):
        answer = await api.get(path, follow_redirects=False)
        assert answer.status_code == 404, path
        assert token not in answer.text and token not in answer.headers.get("location", "")
