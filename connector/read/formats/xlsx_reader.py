"""Excel reader (openpyxl read-only mode: streams rows, one worksheet per record kind)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zipfile import BadZipFile, ZipFile

from openpyxl import load_workbook
from openpyxl.utils.exceptions import InvalidFileException

from connector.errors import InputError
from connector.read.formats.base import DEFAULT_LIMITS, RawRow, ReadLimits, RowLocation


def sheet_names(path: Path, limits: ReadLimits = DEFAULT_LIMITS) -> list[str]:
    """The worksheet names of a workbook."""
    workbook = _open(path, limits)
    try:
        return list(workbook.sheetnames)
    finally:
        workbook.close()


def read_xlsx(path: Path, sheet: str, limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[RawRow]:
    """Stream one worksheet; the first non-empty row is the header. Cached formula values are read, never formulas.
    A row with a cell longer than ``limits.max_cell_chars`` is yielded with an error (it is rejected)."""
    workbook = _open(path, limits)
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
            if any(isinstance(c, str) and len(c) > limits.max_cell_chars for c in cells):
                yield RawRow(location, {}, error=f"a cell is longer than {limits.max_cell_chars} characters "
                                                 "(source.max_cell_chars)")
                continue
            values: dict[str, Any] = {}
            for i, name in enumerate(names):
                if name and name not in values:
                    cell = cells[i] if i < len(cells) else None
                    values[name] = cell.strip() if isinstance(cell, str) else cell
            yield RawRow(location, values)
    finally:
        workbook.close()


def _open(path: Path, limits: ReadLimits) -> Any:
    _check_unpacked_size(path, limits)
    try:
        return load_workbook(path, read_only=True, data_only=True)
    except (InvalidFileException, BadZipFile, OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path.name}: not a readable Excel workbook ({exc.__class__.__name__})") from exc


def _check_unpacked_size(path: Path, limits: ReadLimits) -> None:
    """Refuse a workbook whose parts unpack to more than the limit, before openpyxl unpacks anything (a
    "zip bomb": a few MB of zip whose shared strings unpack to GBs). zipfile stops every part at the size its
    header declares, so the declared sizes bound what can be unpacked."""
    try:
        with ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{path.name}: not a readable Excel workbook ({exc.__class__.__name__})") from exc
    if unpacked > limits.max_unpacked_bytes:
        raise InputError(
            f"{path.name}: the workbook unpacks to {unpacked / 2**20:,.0f} MB, more than the limit of "
            f"{limits.max_unpacked_bytes / 2**20:,.0f} MB (source.max_unpacked_mb): it is damaged or malicious, "
            "or, if it is a real export, raise the limit or export CSV")
