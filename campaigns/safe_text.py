"""Checks for text that ends up in email headers or on a terminal.

A CR or LF in a subject, a sender or a tag could add a header (``Bcc: ...``) at a
provider that builds the message naively; other control characters (escape sequences,
Unicode line and paragraph separators) garble terminals and logs. Values that users
type are refused with the position of the first one; merge values that reach the
subject have them replaced at render time.
"""

from __future__ import annotations

import re
import unicodedata

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def control_character_problem(value: str) -> str | None:
    """Why ``value`` cannot go into a header, naming the first control character, or None."""
    found = _CONTROL.search(value)
    if found is None:
        return None
    char = found.group()
    name = {"\r": "CR", "\n": "LF", "\t": "TAB"}.get(char) or unicodedata.name(
        char, f"U+{ord(char):04X}"
    )
    return (
        f"must not contain control characters such as line breaks "
        f"(found {name} at position {found.start()})"
    )


def refuse_control_characters(value: str) -> str:
    """Return ``value`` unchanged, or raise ``ValueError`` naming its first control character."""
    problem = control_character_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def bounded(text: str, limit: int) -> str:
    """``text`` without control characters, cut to ``limit`` characters with a marker."""
    text = replace_control_characters(text)
    if len(text) <= limit:
        return text
    marker = f"... [cut to {limit:,} of {len(text):,} characters]"
    return text[: limit - len(marker)] + marker


def replace_control_characters(value: str, replacement: str = " ") -> str:
    """``value`` with every control character replaced (for merge values in a subject)."""
    return _CONTROL.sub(replacement, value) if _CONTROL.search(value) else value
