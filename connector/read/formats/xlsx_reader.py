"""Excel reader (openpyxl read-only mode: streams rows, one worksheet per record kind)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zipfile import BadZipFile

from openpyxl import load_workbook
from openpyxl.utils.exceptions import InvalidFileException

from connector.errors import InputError
from connector.read.formats.base import RawRow, RowLocation


def sheet_names(path: Path) -> list[str]:
    """The worksheet names of a workbook."""
    workbook = _open(path)
    try:
        return list(workbook.sheetnames)
    finally:
        workbook.close()


def read_xlsx(path: Path, sheet: str) -> Iterator[RawRow]:
    """Stream one worksheet; the first non-empty row is the header. Cached formula values are read, never formulas."""
    workbook = _open(path)
    try:
        if sheet not in workbook.sheetnames:
            raise InputError(f"{path.name}: no worksheet named {sheet!r} (found: {', '.join(workbook.sheetnames)})")
        worksheet = workbook[sheet]
        # Read-only mode trusts the size the writing program recorded; a wrong one (some exporters write
        # A1:A1) would silently drop rows and columns. Forget it and read what is there.
        worksheet.reset_dimensions()
        names: list[str] | None = None
        for row_number, cells in enumerate(worksheet.iter_rows(values_only=True), start=1):
            if names is None:
                if any(c is not None and str(c).strip() for c in cells):
                    names = [str(c).strip() if c is not None else "" for c in cells]
                continue
            location = RowLocation(path.name, row_number, sheet=sheet)
            values: dict[str, Any] = {}
            for i, name in enumerate(names):
                if name and name not in values:
                    cell = cells[i] if i < len(cells) else None
                    values[name] = cell.strip() if isinstance(cell, str) else cell
            yield RawRow(location, values)
    finally:
        workbook.close()


def _open(path: Path) -> Any:
    try:
        return load_workbook(path, read_only=True, data_only=True)
    except (InvalidFileException, BadZipFile, OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path.name}: not a readable Excel workbook ({exc.__class__.__name__})") from exc
