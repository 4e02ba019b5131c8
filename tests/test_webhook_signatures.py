"""Our webhook signature check agrees with the svix package's on every case (pure)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from svix.webhooks import Webhook

from campaigns.api._resend_events import Refused, SignatureCheck
from tests.api_support import WEBHOOK_SECRET, signed

BODY = b'{"type":"email.delivered","data":{"email_id":"m1"}}'
OTHER = "whsec_" + base64.b64encode(b"another key of thirty-two bytes!").decode()


def svix_accepts(body: bytes, headers: dict[str, str]) -> bool:
    try:
        Webhook(WEBHOOK_SECRET).verify(body, headers)
    except Exception:
        return False
    return True


def ours_accepts(body: bytes, headers: dict[str, str]) -> bool:
    try:
        SignatureCheck(WEBHOOK_SECRET).verify(body, headers, now=datetime.now(UTC))
    except Refused:
        return False
    return True


def cases() -> dict[str, tuple[bytes, dict[str, str]]]:
    now = datetime.now(UTC)  # at the test's run, not at collection
    good = signed(BODY, svix_id="msg_1")
    wrong = signed(BODY, svix_id="msg_1", secret=OTHER)
    sig = good["svix-signature"]
    return {
        "valid": (BODY, good),
        "valid among several (rotation)": (
            BODY,
            {**good, "svix-signature": f"{wrong['svix-signature']} {sig}"},
        ),
        "only a v2 signature": (BODY, {**good, "svix-signature": "v2," + sig[3:]}),
        "wrong secret": (BODY, wrong),
        "body changed": (BODY + b" ", good),
        "id changed": (BODY, {**good, "svix-id": "msg_2"}),
        "timestamp changed": (
            BODY,
            {**good, "svix-timestamp": str(int(good["svix-timestamp"]) + 1)},
        ),
        "stale": (BODY, signed(BODY, svix_id="msg_1", timestamp=now - timedelta(minutes=6))),
        "ahead": (BODY, signed(BODY, svix_id="msg_1", timestamp=now + timedelta(minutes=6))),
        "truncated signature": (BODY, {**good, "svix-signature": sig[:-4]}),
        "empty signature": (BODY, {**good, "svix-signature": "v1,"}),
    }


@pytest.mark.parametrize("case", list(cases()))
def test_our_check_agrees_with_svix(case: str) -> None:
    body, headers = cases()[case]
    assert ours_accepts(body, headers) == svix_accepts(body, headers), case
    assert ours_accepts(body, headers) == case.startswith("valid")


def test_cases_svix_would_crash_on_are_refused_by_ours() -> None:
    good = signed(BODY, svix_id="msg_1")
    for signature in ("v1", "v1,a,b", "v1,!!!", "v1," + "A" * 3):
        assert not ours_accepts(BODY, {**good, "svix-signature": signature})


def test_a_secret_that_is_not_a_signing_secret_is_refused_at_start() -> None:
    for secret in ("whsec_", "whsec_!!!!", ""):
        with pytest.raises(ValueError, match="WEBHOOK_SECRET"):
            SignatureCheck(secret)


def test_a_secret_without_its_prefix_or_too_short_is_refused() -> None:
    for secret in ("nope", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError, match="WEBHOOK_SECRET"):
            SignatureCheck(secret)
