"""Small helpers shared by the mappers."""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from typing import Any

from .context import MappingContext


def compact(value: Any) -> Any:
    """Drop None, empty strings, empty lists and empty dicts, recursively (FHIR forbids empty elements)."""
    # written for speed: this walks every mapped element (the mapping benchmark counts it)
    kind = type(value)
    if kind is dict:
        out: dict[str, Any] = {}
        for key, item in value.items():
            item_kind = type(item)
            if item_kind is dict or item_kind is list:
                item = compact(item)
                if not item:
                    continue
            elif item is None or (item_kind is str and not item):
                continue
            out[key] = item
        return out
    if kind is list:
        items = []
        for item in value:
            item_kind = type(item)
            if item_kind is dict or item_kind is list:
                item = compact(item)
                if not item:
                    continue
            elif item is None or (item_kind is str and not item):
                continue
            items.append(item)
        return items
    return value


def fhir_decimal(value: Decimal | float) -> int | float:
    """A JSON number for a FHIR decimal: integral values as int, others as float."""
    if isinstance(value, Decimal):
        if value == value.to_integral_value():
            return int(value)
        return float(value)
    return value


def iso_date(value: date) -> str:
    """A FHIR ``date``."""
    return value.isoformat()


def resource(resource_type: str, ctx: MappingContext, **elements: Any) -> dict[str, Any]:
    """A resource dict: resourceType, meta.source, then the elements in the given order, empty ones left out.

    Only the top level is compacted (walking every nested element cost a quarter of the mapping time): a
    mapper builds nested elements without empties, or passes them through :func:`compact` itself.
    tests/unit/test_mappers.py checks that every mapped resource is compact all the way down."""
    out = {"resourceType": resource_type, "meta": ctx.meta()}
    for key, item in elements.items():
        if item is None or item == "" or item == [] or item == {}:
            continue
        out[key] = item
    return out


# Characters CommonMark gives a meaning anywhere in a line (emphasis, code, links, raw HTML, entities, tables).
_MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]<>&|~])")
# Line starts that make a heading, quote, list item or thematic break.
_MARKDOWN_LINE_START = re.compile(r"^(\s*)([#>+\-=]|\d+[.)])", re.MULTILINE)


_BACKSLASH_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")


def plain_text(markdown: str) -> str:
    """The text a :func:`markdown_text` value stands for (CommonMark backslash escapes removed): narratives show
    a note as the supporter wrote it, escaped for XHTML instead."""
    return _BACKSLASH_ESCAPE.sub(r"\1", markdown)


def markdown_text(text: str) -> str:
    """Source text as FHIR ``markdown`` that renders as the text itself: markup characters are backslash-escaped,
    so source HTML such as ``<script>`` shows as written and never renders (CommonMark §2.4 backslash escapes)."""
    escaped = _MARKDOWN_INLINE.sub(r"\\\1", text)
    return _MARKDOWN_LINE_START.sub(lambda m: m.group(1) + "".join("\\" + ch if not ch.isdigit() else ch
                                                                     for ch in m.group(2)), escaped)
