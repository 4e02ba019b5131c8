"""The simulator's admin endpoints over real HTTP: refused without the admin token,
served with it; ``/health`` and the provider API keep their own rules."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from simulator import SimulatorConfig, start_simulator

API_KEY = "re_admin_test_" + uuid.uuid4().hex
ADMIN_TOKEN = "simadm_" + uuid.uuid4().hex

# Every admin endpoint, with a request that would succeed given the token.
ADMIN_REQUESTS = [
    ("GET", "/_sim/stats", None),
    ("GET", "/_sim/deliveries", None),
    ("GET", "/_sim/messages", None),
    ("GET", "/_sim/config", None),
    ("PUT", "/_sim/config", {"latency_ms": 0}),
    ("POST", "/_sim/faults", []),
    ("POST", "/_sim/reset", None),
]
EMAIL = {"from": "a@example.com", "to": "b@example.com", "subject": "s", "text": "t"}


async def _serve(admin_token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    _, runner, url = await start_simulator(
        SimulatorConfig(api_keys=[API_KEY]), admin_token=admin_token
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            yield http
    finally:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A simulator with an admin token, and a client with no credentials."""
    async for client in _serve(ADMIN_TOKEN):
        yield client


@pytest.fixture
async def http_without_admin() -> AsyncIterator[httpx.AsyncClient]:
    """A simulator started with no admin token."""
    async for client in _serve(None):
        yield client


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _request(
    http: httpx.AsyncClient, method: str, path: str, body: object, headers: dict[str, str]
) -> httpx.Response:
    return await http.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_REQUESTS)
async def test_admin_endpoint_without_a_token_is_refused(
    http: httpx.AsyncClient, method: str, path: str, body: object
) -> None:
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {ADMIN_TOKEN}"}):
        answer = await _request(http, method, path, body, headers)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.json()["name"] == "missing_admin_token"
        assert "Authorization: Bearer" in answer.json()["message"]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_REQUESTS)
async def test_admin_endpoint_with_a_wrong_token_is_refused(
    http: httpx.AsyncClient, method: str, path: str, body: object
) -> None:
    # The provider API key is not an admin token, nor is a prefix of the real one.
    for wrong in (API_KEY, ADMIN_TOKEN[:-1], ADMIN_TOKEN + "x", "simadm_" + uuid.uuid4().hex):
        answer = await _request(http, method, path, body, _bearer(wrong))
        assert answer.status_code == 403, answer.text
        assert answer.json() == {
            "statusCode": 403,
            "name": "invalid_admin_token",
            "message": "The admin token is invalid.",
        }


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_REQUESTS)
async def test_admin_endpoint_with_the_token_works(
    http: httpx.AsyncClient, method: str, path: str, body: object
) -> None:
    answer = await _request(http, method, path, body, _bearer(ADMIN_TOKEN))
    assert answer.status_code == 200, answer.text


async def test_admin_endpoints_are_refused_when_no_token_is_configured(
    http_without_admin: httpx.AsyncClient,
) -> None:
    for method, path, body in ADMIN_REQUESTS:
        for headers in ({}, _bearer(ADMIN_TOKEN), _bearer(API_KEY)):
            answer = await _request(http_without_admin, method, path, body, headers)
            assert answer.status_code == 403, (path, answer.text)
            error = answer.json()
            assert error["name"] == "admin_disabled"
            assert "SIMULATOR_ADMIN_TOKEN" in error["message"]  # says how to enable them
    assert (await http_without_admin.get("/health")).json() == {"ok": True}


async def test_health_and_the_provider_api_keep_their_own_auth(http: httpx.AsyncClient) -> None:
    assert (await http.get("/health")).status_code == 200
    sent = await http.post("/emails/batch", json=[EMAIL], headers=_bearer(API_KEY))
    assert sent.status_code == 200, sent.text
    missing = await http.post("/emails/batch", json=[EMAIL])
    assert missing.status_code == 401 and missing.json()["name"] == "missing_api_key"
    # The admin token opens the admin API only, never the provider API.
    as_key = await http.post("/emails/batch", json=[EMAIL], headers=_bearer(ADMIN_TOKEN))
    assert as_key.status_code == 403 and as_key.json()["name"] == "invalid_api_key"
    stats = await http.get("/_sim/stats", headers=_bearer(ADMIN_TOKEN))
    assert stats.json()["accepted_emails"] == 1


async def test_config_never_shows_the_admin_token_or_the_api_keys(
    http: httpx.AsyncClient,
) -> None:
    auth = _bearer(ADMIN_TOKEN)
    shown = [
        (await http.get("/_sim/config", headers=auth)).text,
        (await http.put("/_sim/config", json={"latency_ms": 1}, headers=auth)).text,
    ]
    for text in shown:
        assert ADMIN_TOKEN not in text and API_KEY not in text
        assert "api_keys" not in text and "admin" not in text


async def test_the_admin_token_cannot_become_an_api_key(http: httpx.AsyncClient) -> None:
    auth = _bearer(ADMIN_TOKEN)
    refused = await http.put("/_sim/config", json={"api_keys": [ADMIN_TOKEN]}, headers=auth)
    assert refused.status_code == 422, refused.text
    assert ADMIN_TOKEN not in refused.text
    # The configuration is unchanged: the old key still sends.
    sent = await http.post("/emails/batch", json=[EMAIL], headers=_bearer(API_KEY))
    assert sent.status_code == 200
    with pytest.raises(ValueError, match="must not be one of the API keys"):
        await start_simulator(SimulatorConfig(api_keys=[ADMIN_TOKEN]), admin_token=ADMIN_TOKEN)


@pytest.mark.parametrize("body", [None, [1, 2], "fast", 42])
async def test_a_config_update_that_is_not_an_object_is_refused(
    http: httpx.AsyncClient, body: object
) -> None:
    answer = await _request(http, "PUT", "/_sim/config", body, _bearer(ADMIN_TOKEN))
    assert answer.status_code == 422 and answer.json()["name"] == "validation_error"


async def test_stats_count_recipients_delivered_more_than_once(http: httpx.AsyncClient) -> None:
    """Duplicates are what the exactly-once checks read: counted as they happen, per
    recipient whatever the case of the address, and forgotten by a reset."""
    admin = _bearer(ADMIN_TOKEN)
    twice = {**EMAIL, "to": ["Twice@example.com"]}
    batches = [[EMAIL, twice], [{**twice, "to": ["twice@example.com"]}], [twice]]
    for batch in batches:
        sent = await http.post("/emails/batch", json=batch, headers=_bearer(API_KEY))
        assert sent.status_code == 200, sent.text
    stats = (await http.get("/_sim/stats", headers=admin)).json()
    assert stats["unique_recipients"] == 2 and stats["accepted_emails"] == 4
    assert stats["duplicated_recipients"] == 1
    assert stats["max_deliveries_per_recipient"] == 3
    assert (await http.post("/_sim/reset", headers=admin)).status_code == 200
    stats = (await http.get("/_sim/stats", headers=admin)).json()
    assert stats["duplicated_recipients"] == 0 and stats["max_deliveries_per_recipient"] == 0
