"""One-click unsubscribe (RFC 8058, RFC 2369): signed tokens and the header values.

A token names an org, a campaign and a recipient (the ledger's ``recipients.id``),
never an address. It is ``v1.`` followed by the base64url form (no padding) of::

    key id (4) | recipient id (8, big-endian) | len | org | len | campaign | HMAC (16)

The HMAC-SHA256 (cut to 128 bits) covers the version prefix and every byte before
it. The key id is derived from the secret that signed the token, so after a rotation
a token names the secret to check it with: the current one or one of the previous
ones, which are kept to verify only. Tokens are deterministic: a retried batch renders
the same body, and provider requests are idempotent by body.

Pure: the standard library only, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, urlsplit

VERSION = "v1"
_PREFIX = VERSION + "."
MAX_TOKEN_LENGTH = 512
"""Longer tokens are refused before any decoding."""
MIN_SECRET_LENGTH = 32
MAX_ID_BYTES = 128
"""An org or campaign id is at most this many UTF-8 bytes in a token."""
_KEY_ID_BYTES = 4
_MAC_BYTES = 16
_HEAD = struct.Struct(">4sQ")  # key id, recipient id
_MIN_BODY = _HEAD.size + 1 + 1 + 1 + 1 + _MAC_BYTES  # one-byte org and campaign ids
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
# What a base URL may hold: printable ASCII with nothing that ends a header's <...>.
_URL_CHARS = re.compile(r"[\x21-\x7e]+")
_URL_FORBIDDEN = frozenset('<>"\\`,')
_MAILTO_ADDRESS = re.compile(
    r"[a-zA-Z0-9.!#$%&'*+/=^_`{|}~-]+"
    r"@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
)
ONE_CLICK = "List-Unsubscribe=One-Click"
"""The body of an RFC 8058 one-click POST, and the List-Unsubscribe-Post header value."""


class InvalidToken(ValueError):
    """A token that does not verify; ``reason`` is a short code, never the token."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid unsubscribe token ({reason})")
        self.reason = reason


class UnsubscribeConfigError(ValueError):
    """An unsubscribe setting that is missing or wrong; the message names the variable."""


@dataclass(frozen=True, slots=True)
class UnsubscribeTarget:
    """Who a token unsubscribes: a recipient of an org, from a campaign's message."""

    org: str
    campaign_id: str
    recipient_id: int


class _UnsubscribeSettings(Protocol):
    @property
    def unsubscribe_base_url(self) -> str | None: ...
    @property
    def unsubscribe_mailto(self) -> str | None: ...

    # SecretStr-like: only ``get_secret_value`` is used.
    @property
    def unsubscribe_secret(self) -> _Secret | None: ...
    @property
    def unsubscribe_previous_secrets(self) -> _Secret | None: ...


class _Secret(Protocol):
    def get_secret_value(self) -> str: ...


def _key_id(secret: bytes) -> bytes:
    # Domain-separated, so the published id is not a plain hash of the secret.
    return hashlib.sha256(b"campaigns-unsubscribe-key-id\x00" + secret).digest()[:_KEY_ID_BYTES]


class _Mac:
    """HMAC-SHA256 under one key, cut to ``_MAC_BYTES``: the RFC 2104 construction with
    the padded key's hash states computed once. The same bytes as ``hmac.new``, at a
    fraction of its cost: it sets up the key on every call, one a message sent."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret: bytes) -> None:
        block = hashlib.sha256().block_size
        key = hashlib.sha256(secret).digest() if len(secret) > block else secret
        key = key.ljust(block, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._inner.update(_PREFIX.encode())
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def __call__(self, signed: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(signed)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:_MAC_BYTES]


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    if not _BASE64URL.fullmatch(text):
        raise InvalidToken("malformed")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed") from None
    # One spelling per token: unused trailing bits must be zero.
    if _encode(data) != text:
        raise InvalidToken("malformed")
    return data


def _id_bytes(value: str, what: str) -> bytes:
    data = value.encode("utf-8")
    if not 1 <= len(data) <= MAX_ID_BYTES:
        raise ValueError(f"{what} must be 1 to {MAX_ID_BYTES} bytes for an unsubscribe token")
    return data


def _check_secret(secret: str | bytes, variable: str) -> bytes:
    data = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if len(data.strip()) < MIN_SECRET_LENGTH:
        raise UnsubscribeConfigError(f"{variable} must be at least {MIN_SECRET_LENGTH} characters")
    return data


def check_base_url(base_url: str, variable: str = "UNSUBSCRIBE_BASE_URL") -> str:
    """The base URL without a trailing ``/``, or an error naming ``variable``.

    It must be http(s) with a host, no credentials, query or fragment, and only
    printable ASCII that can stand inside a header's ``<...>``.
    """
    if not base_url or not base_url.strip():
        raise UnsubscribeConfigError(f"{variable} is not set")
    value = base_url.strip()
    if not _URL_CHARS.fullmatch(value) or _URL_FORBIDDEN & set(value):
        raise UnsubscribeConfigError(
            f"{variable} must be printable ASCII without spaces, quotes, commas or <>"
        )
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsed only to refuse a malformed port
    except ValueError:
        raise UnsubscribeConfigError(f"{variable} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsubscribeConfigError(f"{variable} must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise UnsubscribeConfigError(f"{variable} must not hold credentials")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise UnsubscribeConfigError(f"{variable} must not have a query or a fragment")
    return value.rstrip("/")


def check_mailto(address: str, variable: str = "UNSUBSCRIBE_MAILTO") -> str:
    """One bare address (``unsubscribe@example.com``), or an error naming ``variable``."""
    value = address.strip()
    if value.lower().startswith("mailto:"):
        value = value[len("mailto:") :]
    if len(value) > 254 or not _MAILTO_ADDRESS.fullmatch(value):
        raise UnsubscribeConfigError(
            f"{variable} must be one address like unsubscribe@example.com (no name, list or query)"
        )
    return value


class UnsubscribeLinks:
    """Signs and verifies unsubscribe tokens; builds the links and headers of a message."""

    __slots__ = ("_base_url", "_current", "_current_id", "_keys", "_mailto")

    def __init__(
        self,
        base_url: str,
        secret: str | bytes,
        previous: Iterable[str | bytes] = (),
        mailto: str | None = None,
    ) -> None:
        """``secret`` signs; it and ``previous`` verify. Raises ``UnsubscribeConfigError``
        for a bad base URL, a secret shorter than 32 characters or a bad ``mailto``."""
        self._base_url = check_base_url(base_url)
        current = _check_secret(secret, "UNSUBSCRIBE_SECRET")
        self._current_id = _key_id(current)
        self._current = _Mac(current)
        keys: dict[bytes, list[bytes]] = {self._current_id: [current]}
        for old in previous:
            data = _check_secret(old, "UNSUBSCRIBE_PREVIOUS_SECRETS")
            same_id = keys.setdefault(_key_id(data), [])
            if data not in same_id:
                same_id.append(data)
        self._keys = {key_id: [_Mac(data) for data in same] for key_id, same in keys.items()}
        self._mailto = check_mailto(mailto) if mailto else None

    @classmethod
    def from_settings(cls, settings: _UnsubscribeSettings) -> UnsubscribeLinks:
        """Build from ``UNSUBSCRIBE_*`` settings.

        Raises:
            UnsubscribeConfigError: naming the variable that is missing or wrong.
        """
        if not settings.unsubscribe_base_url:
            raise UnsubscribeConfigError(
                "UNSUBSCRIBE_BASE_URL is not set (the public http(s) URL of the "
                "unsubscribe endpoint, e.g. https://unsubscribe.example.com)"
            )
        if settings.unsubscribe_secret is None:
            raise UnsubscribeConfigError(
                f"UNSUBSCRIBE_SECRET is not set (at least {MIN_SECRET_LENGTH} random characters)"
            )
        previous_text = (
            settings.unsubscribe_previous_secrets.get_secret_value()
            if settings.unsubscribe_previous_secrets is not None
            else ""
        )
        previous = [part.strip() for part in previous_text.split(",") if part.strip()]
        return cls(
            settings.unsubscribe_base_url,
            settings.unsubscribe_secret.get_secret_value().strip(),
            previous,
            mailto=settings.unsubscribe_mailto or None,
        )

    def __repr__(self) -> str:
        return f"UnsubscribeLinks(base_url={self._base_url!r}, keys={len(self._keys)})"

    def token(self, org: str, campaign_id: str, recipient_id: int) -> str:
        """The token of one recipient of one campaign; the same inputs give the same token."""
        if not 0 < recipient_id < 2**63:
            raise ValueError("recipient_id must be a positive 64-bit integer")
        org_bytes = _id_bytes(org, "org")
        campaign_bytes = _id_bytes(campaign_id, "campaign_id")
        signed = b"".join(
            (
                _HEAD.pack(self._current_id, recipient_id),
                bytes((len(org_bytes),)),
                org_bytes,
                bytes((len(campaign_bytes),)),
                campaign_bytes,
            )
        )
        return _PREFIX + _encode(signed + self._current(signed))

    def url(self, org: str, campaign_id: str, recipient_id: int) -> str:
        """The https://.../u/TOKEN link of one recipient of one campaign."""
        return f"{self._base_url}/u/{self.token(org, campaign_id, recipient_id)}"

    def headers(self, url: str) -> dict[str, str]:
        """``List-Unsubscribe`` (with the mailto form when configured) and
        ``List-Unsubscribe-Post`` for one message, whose link ``url`` made: the body's
        link and the header's are one token."""
        links = [f"<{url}>"]
        if self._mailto:
            links.append(f"<mailto:{quote(self._mailto, safe='@')}?subject=unsubscribe>")
        return {"List-Unsubscribe": ", ".join(links), "List-Unsubscribe-Post": ONE_CLICK}

    def verify(self, token: str) -> UnsubscribeTarget:
        """Who ``token`` unsubscribes.

        Raises:
            InvalidToken: with a short reason (``too_long``, ``version``, ``malformed``,
                ``truncated``, ``unknown_key``, ``signature``); never the token itself.
        """
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("too_long" if isinstance(token, str) else "malformed")
        if not token.startswith(_PREFIX):
            raise InvalidToken("version")
        data = _decode(token[len(_PREFIX) :])
        if len(data) < _MIN_BODY:
            raise InvalidToken("truncated")
        signed, mac = data[:-_MAC_BYTES], data[-_MAC_BYTES:]
        key_id, recipient_id = _HEAD.unpack_from(signed)
        candidates = self._keys.get(key_id)
        if not candidates:
            raise InvalidToken("unknown_key")
        # Every candidate is compared, so timing does not tell which one matched.
        matched = False
        for sign in candidates:
            matched |= hmac.compare_digest(sign(signed), mac)
        if not matched:
            raise InvalidToken("signature")
        return _parse(signed, recipient_id)

    @property
    def mailto(self) -> str | None:
        """The mailto address of ``List-Unsubscribe``, when one is configured."""
        return self._mailto


def _parse(signed: bytes, recipient_id: int) -> UnsubscribeTarget:
    """The fields of a signed body (already verified: malformed only if we wrote it so)."""
    at = _HEAD.size
    fields: list[str] = []
    for _ in range(2):
        if at >= len(signed):
            raise InvalidToken("malformed")
        size = signed[at]
        value = signed[at + 1 : at + 1 + size]
        if size == 0 or len(value) != size:
            raise InvalidToken("malformed")
        try:
            fields.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidToken("malformed") from None
        at += 1 + size
    if at != len(signed) or recipient_id <= 0:
        raise InvalidToken("malformed")
    return UnsubscribeTarget(org=fields[0], campaign_id=fields[1], recipient_id=recipient_id)


def one_click_requested(form: Mapping[str, list[str]]) -> bool:
    """Whether a parsed form body asks to unsubscribe: RFC 8058's
    ``List-Unsubscribe=One-Click``, or the page's ``confirm=1``."""
    return "One-Click" in form.get("List-Unsubscribe", []) or "1" in form.get("confirm", [])
