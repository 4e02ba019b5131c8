"""Merge-field templates: ``Hello {{ name }}``.

Templates are compiled once into literal/field parts, so rendering a message is a
single ``str.join``. Values are HTML-escaped in the html body and left as they are in
the subject and the text body.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_UNCLOSED = re.compile(r"\{\{(?![^{}]*\}\})")

BUILTIN_FIELDS = frozenset({"email", "name"})
"""Fields every recipient has, whatever columns its audience was imported with."""


class TemplateError(ValueError):
    """A template that cannot be compiled (for example an unclosed ``{{``)."""


def fields_used(template: str) -> set[str]:
    """Return the merge-field names a template refers to."""
    if _UNCLOSED.search(template):
        raise TemplateError("has an unclosed '{{' (merge fields look like {{ name }})")
    return set(_FIELD.findall(template))


@dataclass(frozen=True, slots=True)
class CompiledTemplate:
    """A template split into alternating literal and field parts."""

    literals: tuple[str, ...]
    fields: tuple[str, ...]
    escape: Callable[[str], str] | None

    def render(self, values: Mapping[str, object]) -> str:
        """Render with ``values``; a missing or null field renders as an empty string."""
        if not self.fields:
            return self.literals[0]
        out = [self.literals[0]]
        for field, literal in zip(self.fields, self.literals[1:], strict=True):
            value = values.get(field)
            text = "" if value is None else str(value)
            out.append(self.escape(text) if self.escape else text)
            out.append(literal)
        return "".join(out)


def compile_template(template: str, *, html_body: bool = False) -> CompiledTemplate:
    """Compile ``template``; ``html_body`` turns on HTML escaping of field values."""
    fields_used(template)  # raises on malformed input
    parts = _FIELD.split(template)
    return CompiledTemplate(
        literals=tuple(parts[0::2]),
        fields=tuple(parts[1::2]),
        escape=html.escape if html_body else None,
    )
