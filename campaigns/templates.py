"""Merge-field templates: ``Hello {{ name }}``.

Templates are compiled once into literal/field parts, so rendering a message is a
single ``str.join``. Values are HTML-escaped in the html body and left as they are in
the subject and the text body.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from campaigns.safe_text import replace_control_characters

# A field name is a word (letters, digits, _) not starting with a digit; ``\w`` and
# ``\d`` are Unicode-aware, so ``{{ prénom }}`` works like ``{{ name }}``.
_NAME = re.compile(r"[^\W\d]\w*")
_PLACEHOLDER = re.compile(r"\{\{([^{}]*)\}\}")
_UNCLOSED = re.compile(r"\{\{(?![^{}]*\}\})")

UNSUBSCRIBE_URL_FIELD = "unsubscribe_url"
"""The recipient's one-click unsubscribe link, filled in by the send path."""
BUILTIN_FIELDS = frozenset({"email", "name", UNSUBSCRIBE_URL_FIELD})
"""Fields every message has, whatever columns its audience was imported with: the
recipient's address and name, and its unsubscribe link. They win over a CSV column of
the same name."""


class TemplateError(ValueError):
    """A template that cannot be compiled (for example an unclosed ``{{``)."""


def is_field_name(name: str) -> bool:
    """Whether ``name`` can be written as a merge field, ``{{ name }}``."""
    return _NAME.fullmatch(name) is not None


def field_name_for(column: str) -> str:
    """The merge-field name for a CSV column: each non-word character becomes ``_``.

    A leading digit gets a ``_`` in front and an empty column becomes ``_``, so the
    result always satisfies :func:`is_field_name`.
    """
    name = re.sub(r"\W", "_", unicodedata.normalize("NFC", column))
    return name if is_field_name(name) else f"_{name}"


def _split(template: str, *, strict: bool) -> list[str]:
    """Alternating literal and field-name parts.

    ``strict`` refuses a ``{{ ... }}`` that is not a field name; otherwise it stays
    literal text, as it was before names were checked.
    """
    if _UNCLOSED.search(template):
        raise TemplateError("has an unclosed '{{' (merge fields look like {{ name }})")
    raw = _PLACEHOLDER.split(template)
    parts, bad = [raw[0]], []
    for index in range(1, len(raw), 2):
        # NFC, as at import, so a name typed in decomposed form still matches
        name = unicodedata.normalize("NFC", raw[index].strip())
        if is_field_name(name):
            parts += [name, raw[index + 1]]
        else:
            bad.append(f"'{{{{{raw[index]}}}}}'")
            parts[-1] += "{{" + raw[index] + "}}" + raw[index + 1]
    if bad and strict:
        verb = "is not a merge field" if len(bad) == 1 else "are not merge fields"
        raise TemplateError(
            f"{' and '.join(bad)} {verb}: a name is letters, digits and _, "
            "not starting with a digit (like {{ first_name }})"
        )
    return parts


def fields_used(template: str, *, strict: bool = True) -> set[str]:
    """Return the merge-field names a template refers to.

    Raises:
        TemplateError: on an unclosed ``{{``; when ``strict``, also on a ``{{ ... }}``
            that is not a field name (a spec is held to that when it starts).
    """
    return set(_split(template, strict=strict)[1::2])


@dataclass(frozen=True, slots=True)
class CompiledTemplate:
    """A template split into alternating literal and field parts."""

    literals: tuple[str, ...]
    fields: tuple[str, ...]
    escape: Callable[[str], str] | None

    def render(self, values: Mapping[str, object]) -> str:
        """Render with ``values``; a missing or null field renders as an empty string."""
        literals = self.literals
        if not self.fields:
            return literals[0]
        get, escape = values.get, self.escape
        out = [literals[0]]
        for index, field in enumerate(self.fields, 1):
            value = get(field)
            text = "" if value is None else value if type(value) is str else str(value)
            out.append(escape(text) if escape else text)
            out.append(literals[index])
        return "".join(out)


def compile_template(
    template: str, *, html_body: bool = False, header_value: bool = False
) -> CompiledTemplate:
    """Compile ``template``; ``html_body`` turns on HTML escaping of field values, and
    ``header_value`` replaces control characters in them (a CR/LF in a merge value must
    not start a new header when the template is a subject).

    Lenient about non-field placeholders, so a spec stored before they were refused
    still renders as it did; new specs are refused them when they start.
    """
    parts = _split(template, strict=False)
    return CompiledTemplate(
        literals=tuple(parts[0::2]),
        fields=tuple(parts[1::2]),
        escape=html.escape if html_body else replace_control_characters if header_value else None,
    )
