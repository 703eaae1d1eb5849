"""Reading one value of a raw row, the same way for fields, templates and `where` filters. Pure: no I/O.

A column name reads the cell of that column; for JSON records, a dotted name (`form.case.@case_id`) reads a
nested value when no key has that exact name. A value becomes text as its format spells it: JSON `true` /
`false` as `true` / `false` (not Python's `True`), whole numbers without `.0` (Excel stores numbers as floats).
"""

from __future__ import annotations

from typing import Any

_MISSING = object()


def value_at(row: dict[str, Any], column: str) -> Any:
    """The value of ``column`` in ``row`` (a dotted path into nested JSON records); None when absent."""
    found = lookup(row, column)
    return None if found is _MISSING else found


def has_path(row: dict[str, Any], column: str) -> bool:
    """True when ``row`` has ``column`` (its value may be empty): tells a mistyped path from an empty one."""
    return lookup(row, column) is not _MISSING


def lookup(row: dict[str, Any], column: str) -> Any:
    """The value of ``column``, or the module's _MISSING marker when the row has no such key or path."""
    if column in row:
        return row[column]
    node: Any = row
    for part in column.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def cell_text(value: Any) -> str:
    """A scalar value as text, spelled as JSON spells it: `true`/`false`, `7` for 7.0; trimmed. None is ''."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def key_paths(row: dict[str, Any], limit: int = 500) -> set[str]:
    """Every key and dotted path of nested objects in ``row`` (at most ``limit``): names to suggest from."""
    paths: set[str] = set()
    stack: list[tuple[str, dict[str, Any]]] = [("", row)]
    while stack and len(paths) < limit:
        prefix, node = stack.pop()
        for key, value in node.items():
            path = f"{prefix}{key}"
            paths.add(path)
            if isinstance(value, dict):
                stack.append((path + ".", value))
    return paths
