"""The row type every reader yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ReadLimits:
    """Bounds on what one input may make the reader hold in memory (``[source]`` settings; docs/configuration.md).

    A workbook is a zip file: a few MB can unpack to GBs (a "zip bomb"), and openpyxl keeps a workbook's whole
    shared-strings table in memory, so the declared unpacked size is checked before anything is unpacked (zipfile
    never yields more than an entry declares). Text formats are read a bounded line (or JSON record) at a time.
    """

    max_unpacked_bytes: int = 512 * 1024 * 1024  # a workbook's total unpacked size
    # One cell, and one CSV/NDJSON line or JSON record: generous (a 50 MB pasted note is delivered intact, see
    # the hostile-input scenario), yet bounded.
    max_cell_chars: int = 64 * 1024 * 1024  # a longer cell rejects its row
    max_line_bytes: int = 64 * 1024 * 1024  # a longer line or record stops the read (characters, for text)


DEFAULT_LIMITS = ReadLimits()


@dataclass(frozen=True, slots=True)
class RowLocation:
    """Where a row came from: file, optional sheet, and a 1-based row (spreadsheet numbering, header = 1)
    or line (NDJSON) or array index (JSON); for CSV also the file line the row starts on, which an editor
    shows and which differs from the row once a quoted cell (notes) spans lines."""

    file: str
    row: int
    sheet: str | None = None
    unit: str = "row"  # "row", "line" or "index"
    line: int | None = None  # CSV: the 1-based line the row starts on

    def __str__(self) -> str:
        sheet = f"[{self.sheet}]" if self.sheet else ""
        return f"{self.file}{sheet} {describe_row(self.unit, self.row, self.line)}"


def describe_row(unit: str, row: int, line: int | None) -> str:
    """How a row is named to people: "row 46", or "row 46 (line 51)" where the editor's line differs."""
    return f"{unit} {row}" if line is None or line == row else f"{unit} {row} (line {line})"


@dataclass(frozen=True, slots=True)
class RawRow:
    """One source row before mapping: column -> value (str for text formats; native types from Excel/JSON)."""

    location: RowLocation
    values: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set when the row could not be decoded; the row is then rejected

    def is_blank(self) -> bool:
        """True when every cell is empty (blank spreadsheet rows are counted, not mapped)."""
        return self.error is None and all(v is None or (isinstance(v, str) and not v.strip())
                                          for v in self.values.values())
