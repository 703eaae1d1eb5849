"""Readers: stream rows out of a program's export files, whatever the format.

Each reader yields :class:`RawRow` objects (a location plus a mapping of column -> cell value) one at a
time, so memory stays flat however large the input. A row that cannot be decoded is still yielded, with
``error`` set, so that the ingest stage can reject it with a reason instead of silently dropping it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from connector.errors import InputError
from connector.read.formats.base import DEFAULT_LIMITS, RawRow, ReadLimits, RowLocation
from connector.read.formats.csv_reader import read_csv
from connector.read.formats.json_reader import read_json, read_ndjson
from connector.read.formats.xlsx_reader import read_xlsx, sheet_names

__all__ = ["DEFAULT_LIMITS", "SUPPORTED_SUFFIXES", "RawRow", "ReadLimits", "RowLocation", "read_rows", "sheet_names"]

SUPPORTED_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".ndjson", ".jsonl", ".xlsx", ".xlsm")


def read_rows(path: Path, *, sheet: str | None = None, json_path: str | None = None,
              limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[RawRow]:
    """Stream the rows of one file (one worksheet for Excel), choosing the reader by file suffix, within
    ``limits`` (a file over them raises InputError naming it; a row with an over-long cell is rejected)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise InputError(f"{path}: input file not found")
    if suffix in (".csv", ".tsv", ".txt"):
        return read_csv(path, limits)
    if suffix in (".ndjson", ".jsonl"):
        return read_ndjson(path, limits)
    if suffix == ".json":
        return read_json(path, json_path, limits)
    if suffix in (".xlsx", ".xlsm"):
        if sheet is None:
            raise InputError(f"{path}: an Excel workbook needs a sheet name in the profile (source.sheet)")
        return read_xlsx(path, sheet, limits)
    raise InputError(f"{path}: unsupported file type {suffix!r} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
