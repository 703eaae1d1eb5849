"""Header matching: find the columns a profile names in a file's header, whatever their case or padding.

Exports get edited by hand: `notes` comes back as `Notes `, a UTF-8 BOM sticks to the first header in some
tools. A profile column matches a header that is equal after removing BOMs and surrounding whitespace and
ignoring case (Unicode case folding). Two headers that match the same profile column are ambiguous: the
file is refused rather than one of them picked silently. Pure: no I/O.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from connector.errors import InputError
from connector.read.profile import RecordSpec, condition_columns

_BOM = "\ufeff"


def normalise_header(name: str) -> str:
    """The form headers are compared in: BOMs and surrounding whitespace removed, case folded."""
    return name.replace(_BOM, "").strip().casefold()


def profile_columns(spec: RecordSpec) -> set[str]:
    """The top-level columns a record kind reads: its fields' columns and template parts, each checkbox
    option's column, and its `where` filter columns (dotted JSON paths are not header names: left out)."""
    columns: set[str] = set()
    for field in spec.fields.values():
        columns.update(field.columns_used())
        if field.checkboxes is not None:
            columns.update(field.checkboxes.prefix + suffix for suffix in field.checkboxes.options)
    columns.update(condition_columns(spec.source.where))
    return {c for c in columns if "." not in c}


def nested_paths(kind: str, spec: RecordSpec) -> dict[str, str]:
    """Dotted JSON paths a record kind reads -> what reads them (`contact.notes`, `contact where`)."""
    paths: dict[str, str] = {}
    for name, field in spec.fields.items():
        for column in field.columns_used():
            if "." in column:
                paths.setdefault(column, f"{kind}.{name}")
    for column in condition_columns(spec.source.where):
        if "." in column:
            paths.setdefault(column, f"{kind} where")
    return paths


def closest_name(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``name`` (difflib ratio >= 0.6, ignoring case), to suggest for a typo."""
    by_form = {c.casefold(): c for c in candidates}
    found = difflib.get_close_matches(name.casefold(), list(by_form), n=1)
    return by_form[found[0]] if found else None


def missing_note(file_name: str, column: str, reader: str, candidates: Iterable[str], *, path: bool) -> str:
    """The warning for a column (or nested JSON path) a profile reads that the file does not have."""
    what = "path" if path else "column"
    where = "in no record of the file" if path else "missing from the file"
    closest = closest_name(column, candidates)
    hint = f"; did you mean {closest!r}?" if closest else ""
    return f"{file_name}: {what} {column!r} (for {reader}) is {where}{hint}"


class HeaderMatcher:
    """Renames a file's headers to the profile's spelling of them (see the module docstring)."""

    def __init__(self, columns: Iterable[str]) -> None:
        self.columns = set(columns)
        self._by_form: dict[str, list[str]] = {}
        for column in sorted(self.columns):
            self._by_form.setdefault(normalise_header(column), []).append(column)

    def renames(self, headers: Iterable[str], file_name: str) -> dict[str, str]:
        """Header as written -> the profile column it stands for, for headers not spelled exactly as in the
        profile. Raises InputError when two headers stand for the same column, or one header for two."""
        by_form: dict[str, list[str]] = {}
        for header in headers:
            by_form.setdefault(normalise_header(header), []).append(header)
        renames: dict[str, str] = {}
        for form, written in by_form.items():
            wanted = self._by_form.get(form)
            if not wanted:
                continue
            if len(written) > 1:
                shown = " and ".join(repr(h) for h in written)
                raise InputError(
                    f"{file_name}: columns {shown} both match the profile's column {wanted[0]!r} (headers are "
                    "matched ignoring case, surrounding spaces and BOMs): rename or remove one of them in the file")
            if len(wanted) > 1:
                shown = " and ".join(repr(c) for c in wanted)
                raise InputError(
                    f"{file_name}: column {written[0]!r} matches the profile's columns {shown} (headers are "
                    "matched ignoring case, surrounding spaces and BOMs): the profile must spell them apart")
            if written[0] != wanted[0]:
                renames[written[0]] = wanted[0]
        return renames

    def present(self, headers: Iterable[str]) -> set[str]:
        """The profile's columns among headers already renamed to its spelling."""
        return self.columns.intersection(headers)
