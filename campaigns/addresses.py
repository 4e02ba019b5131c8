"""Email address checks shared by the importer, the spec validator and the send path.

The pattern is the WHATWG HTML "valid e-mail address" rule: strict enough to keep
garbage away from the provider, fast enough to run on every row of a large import.
"""

from __future__ import annotations

import re
from email.utils import parseaddr

_ADDRESS = re.compile(
    r"^[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+"
    r"@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+$"
)
MAX_ADDRESS_LENGTH = 254
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+$"
)


def is_valid_address(address: str) -> bool:
    """Return True when ``address`` is a deliverable-looking ``local@domain.tld``."""
    return len(address) <= MAX_ADDRESS_LENGTH and _ADDRESS.fullmatch(address) is not None


def is_valid_domain(name: str) -> bool:
    """Return True for a DNS name of two or more labels (``brand.example``), at most 253 long."""
    return _DOMAIN.fullmatch(name) is not None


def normalize_address(address: str) -> str:
    """Trim and lowercase an address so that one mailbox has one spelling."""
    return address.strip().lower()


def parse_sender(value: str) -> tuple[str, str]:
    """Split ``"Name <addr>"`` or ``"addr"`` into (display name, address).

    Raises:
        ValueError: if the address part is missing or malformed.
    """
    name, address = parseaddr(value)
    if not address or not is_valid_address(address):
        raise ValueError(f"'{value}' is not a valid sender; use 'Name <user@example.com>'")
    return name, address


def domain_of(address: str) -> str:
    """Return the domain part of an address."""
    return address.rsplit("@", 1)[-1]
