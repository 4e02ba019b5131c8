"""Unsubscribe tokens and header values: pure, no server."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from pydantic import SecretStr

from campaigns.settings import Settings
from campaigns.unsubscribe import (
    MAX_TOKEN_LENGTH,
    InvalidToken,
    UnsubscribeConfigError,
    UnsubscribeLinks,
    UnsubscribeTarget,
    one_click_requested,
)

SECRET = "s" * 16 + "0123456789abcdef0123"
OLD_SECRET = "old-secret-" + "o" * 30
BASE = "https://unsubscribe.example.com"


def links(**overrides: object) -> UnsubscribeLinks:
    fields: dict[str, object] = {"base_url": BASE, "secret": SECRET}
    fields.update(overrides)
    return UnsubscribeLinks(**fields)  # type: ignore[arg-type]


def reason(links: UnsubscribeLinks, token: str) -> str:
    with pytest.raises(InvalidToken) as refused:
        links.verify(token)
    assert token not in str(refused.value) or len(token) < 3
    return refused.value.reason


def test_a_token_round_trips_to_its_org_campaign_and_recipient() -> None:
    signer = links()
    token = signer.token("acme", "spring-sale", 123_456_789)
    assert signer.verify(token) == UnsubscribeTarget("acme", "spring-sale", 123_456_789)
    assert token.startswith("v1.")
    assert all(c.isalnum() or c in "-_." for c in token)  # URL-safe, no padding
    assert len(token) < 100


def test_the_longest_ids_stay_well_under_the_length_limit() -> None:
    signer = links()
    token = signer.token("o" * 64, "c" * 64, 2**63 - 1)
    assert len(token) < MAX_TOKEN_LENGTH
    assert signer.verify(token) == UnsubscribeTarget("o" * 64, "c" * 64, 2**63 - 1)


def test_tokens_are_deterministic_and_differ_per_recipient_campaign_and_org() -> None:
    signer, again = links(), links()
    token = signer.token("acme", "spring", 7)
    assert again.token("acme", "spring", 7) == token
    others = {
        signer.token("acme", "spring", 8),
        signer.token("acme", "summer", 7),
        signer.token("acmf", "spring", 7),
    }
    assert token not in others and len(others) == 3


def test_a_token_never_carries_the_address() -> None:
    signer = links()
    token = signer.token("acme", "spring", 42)
    decoded = base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4))
    for needle in (b"reader", b"@", b"example.com"):
        assert needle not in decoded
    assert "@" not in signer.url("acme", "spring", 42)


def test_every_changed_character_is_refused() -> None:
    signer = links()
    token = signer.token("acme", "spring-sale", 31337)
    for index in range(len(token)):
        for replacement in ("A", "_", "z"):
            if token[index] == replacement:
                continue
            tampered = token[:index] + replacement + token[index + 1 :]
            assert reason(signer, tampered) in {
                "version",
                "malformed",
                "truncated",
                "unknown_key",
                "signature",
            }


def _forge(token: str, change) -> str:
    body = token[3:]
    data = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    change(data)
    return "v1." + base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode()


def test_each_part_of_the_token_is_covered_by_the_signature() -> None:
    signer = links()
    token = signer.token("acme", "spring", 5)

    def flip(at: int):
        def change(data: bytearray) -> None:
            data[at] ^= 0x01

        return change

    assert reason(signer, _forge(token, flip(0))) == "unknown_key"  # key id
    assert reason(signer, _forge(token, flip(11))) == "signature"  # recipient id
    assert reason(signer, _forge(token, flip(13))) == "signature"  # org
    assert reason(signer, _forge(token, flip(18))) == "signature"  # campaign
    assert reason(signer, _forge(token, flip(-1))) == "signature"  # the MAC itself


def test_truncated_over_long_and_foreign_version_tokens_are_refused() -> None:
    signer = links()
    token = signer.token("acme", "spring", 5)
    for cut in range(1, 8):
        assert reason(signer, token[:-cut]) in {"signature", "malformed"}
    assert reason(signer, token[:15]) == "truncated"
    assert reason(signer, "v1.") == "malformed"
    assert reason(signer, "") == "version"
    assert reason(signer, "v2." + token[3:]) == "version"
    assert reason(signer, token[3:]) == "version"
    assert reason(signer, token + "A" * (MAX_TOKEN_LENGTH - len(token) + 1)) == "too_long"
    assert reason(signer, "v1." + "%" * 20) == "malformed"
    assert reason(signer, token + "=") == "malformed"  # one spelling: no padding


def test_a_token_signed_under_another_secret_is_refused() -> None:
    other = links(secret="x" * 40)
    assert reason(links(), other.token("acme", "spring", 5)) == "unknown_key"


def test_rotation_previous_secrets_verify_and_removed_ones_do_not() -> None:
    before = links(secret=OLD_SECRET)
    old_token = before.token("acme", "spring", 9)
    rotated = links(previous=[OLD_SECRET])
    assert rotated.verify(old_token) == UnsubscribeTarget("acme", "spring", 9)
    # New tokens are signed with the current secret only.
    new_token = rotated.token("acme", "spring", 9)
    assert new_token != old_token
    assert reason(before, new_token) == "unknown_key"
    retired = links()
    assert reason(retired, old_token) == "unknown_key"


def test_headers_follow_rfc_2369_and_rfc_8058() -> None:
    signer = links(base_url=BASE + "/")
    headers = signer.headers(signer.url("acme", "spring", 5))
    token = signer.token("acme", "spring", 5)
    assert headers == {
        "List-Unsubscribe": f"<{BASE}/u/{token}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    with_mailto = links(mailto="unsubscribe@acme.example")
    assert with_mailto.headers(with_mailto.url("acme", "spring", 5))["List-Unsubscribe"] == (
        f"<{BASE}/u/{token}>, <mailto:unsubscribe@acme.example?subject=unsubscribe>"
    )


def test_a_base_url_with_a_path_keeps_it() -> None:
    signer = links(base_url="http://127.0.0.1:8090/mail/")
    assert signer.url("acme", "c", 1).startswith("http://127.0.0.1:8090/mail/u/v1.")


def _settings(**fields: object) -> Settings:
    values: dict[str, object] = {
        "unsubscribe_base_url": BASE,
        "unsubscribe_secret": SecretStr(SECRET),
    }
    values.update(fields)
    return Settings(**values)  # type: ignore[arg-type]


def test_from_settings_reads_the_secrets_and_the_previous_ones() -> None:
    old = UnsubscribeLinks(BASE, OLD_SECRET).token("acme", "spring", 3)
    signer = UnsubscribeLinks.from_settings(
        _settings(
            unsubscribe_previous_secrets=SecretStr(f" {OLD_SECRET} ,, {'p' * 32}"),
            unsubscribe_mailto="mailto:leave@acme.example",
        )
    )
    assert signer.verify(old).recipient_id == 3
    assert signer.mailto == "leave@acme.example"
    assert SECRET not in repr(signer) and OLD_SECRET not in repr(signer)


@pytest.mark.parametrize(
    ("fields", "variable", "words"),
    [
        ({"unsubscribe_base_url": None}, "UNSUBSCRIBE_BASE_URL", "not set"),
        ({"unsubscribe_base_url": "ftp://x.example"}, "UNSUBSCRIBE_BASE_URL", "http"),
        ({"unsubscribe_base_url": "unsubscribe.example.com"}, "UNSUBSCRIBE_BASE_URL", "http"),
        ({"unsubscribe_base_url": "https://x.example/?a=1"}, "UNSUBSCRIBE_BASE_URL", "query"),
        ({"unsubscribe_base_url": "https://x.example/#top"}, "UNSUBSCRIBE_BASE_URL", "fragment"),
        ({"unsubscribe_base_url": "https://u:p@x.example"}, "UNSUBSCRIBE_BASE_URL", "credent"),
        ({"unsubscribe_base_url": "https://x.example/a b"}, "UNSUBSCRIBE_BASE_URL", "ASCII"),
        ({"unsubscribe_base_url": "https://x.example/>"}, "UNSUBSCRIBE_BASE_URL", "<>"),
        ({"unsubscribe_base_url": "https://x.example:99999"}, "UNSUBSCRIBE_BASE_URL", "valid"),
        ({"unsubscribe_secret": None}, "UNSUBSCRIBE_SECRET", "not set"),
        ({"unsubscribe_secret": SecretStr("short")}, "UNSUBSCRIBE_SECRET", "32"),
        (
            {"unsubscribe_previous_secrets": SecretStr("tiny")},
            "UNSUBSCRIBE_PREVIOUS_SECRETS",
            "32",
        ),
        ({"unsubscribe_mailto": "a@x.example, b@x.example"}, "UNSUBSCRIBE_MAILTO", "one"),
        ({"unsubscribe_mailto": "Leave <a@x.example>"}, "UNSUBSCRIBE_MAILTO", "one"),
        ({"unsubscribe_mailto": "a@x.example?cc=b@y"}, "UNSUBSCRIBE_MAILTO", "one"),
        ({"unsubscribe_mailto": "nobody"}, "UNSUBSCRIBE_MAILTO", "one"),
    ],
)
def test_from_settings_refuses_what_is_missing_or_wrong(
    fields: dict[str, object], variable: str, words: str
) -> None:
    with pytest.raises(UnsubscribeConfigError) as refused:
        UnsubscribeLinks.from_settings(_settings(**fields))
    message = str(refused.value)
    assert variable in message and words in message
    assert SECRET not in message


def test_token_inputs_outside_the_rules_are_refused() -> None:
    signer = links()
    for org, campaign, recipient in (("", "c", 1), ("o", "", 1), ("o", "c", 0), ("o", "c", -5)):
        with pytest.raises(ValueError):
            signer.token(org, campaign, recipient)
    with pytest.raises(ValueError):
        signer.token("o" * 129, "c", 1)


def test_one_click_bodies() -> None:
    assert one_click_requested({"List-Unsubscribe": ["One-Click"]})
    assert one_click_requested({"confirm": ["1"]})
    assert not one_click_requested({"List-Unsubscribe": ["one-click-ish"]})
    assert not one_click_requested({})


@pytest.mark.parametrize("secret", [SECRET, "k" * 64, "long-" * 40])
def test_the_token_mac_is_hmac_sha256_of_the_prefix_and_body(secret: str) -> None:
    """A token's MAC is the HMAC-SHA256 of ``v1.`` and its body as ``hmac.new`` makes
    it (so tokens already sent still verify), whatever the key's length."""
    token = links(secret=secret).token("acme", "spring", 42)
    data = base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4))
    signed, mac = data[:-16], data[-16:]
    assert mac == hmac.new(secret.encode(), b"v1." + signed, hashlib.sha256).digest()[:16]
    assert links(secret=secret).verify(token).recipient_id == 42
