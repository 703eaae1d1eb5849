"""CSV reader: encoding and delimiter detection, BOMs, Excel exports, quoted multi-line cells."""

from __future__ import annotations

import codecs
import csv
import sys
from collections.abc import Iterator
from pathlib import Path

from connector.readers.base import RawRow, RowLocation

_SAMPLE_BYTES = 256 * 1024
_DELIMITERS = (",", ";", "\t", "|")

# Very long notes must not crash the reader; memory is bounded by one row anyway.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def detect_encoding(sample: bytes) -> str:
    """Pick an encoding from a byte sample: BOMs first, then UTF-8, else Windows-1252 (Excel's legacy export)."""
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    try:
        sample.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of the sample is still UTF-8.
        if exc.start >= len(sample) - 3:
            return "utf-8"
        return "cp1252"


def detect_delimiter(header_line: str) -> str:
    """The candidate delimiter that occurs most often in the header line (headers rarely contain one)."""
    counts = {d: header_line.count(d) for d in _DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def read_csv(path: Path) -> Iterator[RawRow]:
    """Stream a CSV file's rows as dicts keyed by the (trimmed) header names."""
    with path.open("rb") as raw:
        sample = raw.read(_SAMPLE_BYTES)
    encoding = detect_encoding(sample)
    # surrogateescape: undecodable bytes later in the file surface per row (that row is rejected), not as a crash.
    with path.open("r", encoding=encoding, errors="surrogateescape", newline="") as handle:
        first = handle.readline()
        delimiter = detect_delimiter(first)
        handle.seek(0)
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        names = [h.strip().lstrip("\ufeff") for h in header]
        row_number = 1
        for cells in reader:
            row_number += 1
            location = RowLocation(path.name, row_number)
            if not cells:
                yield RawRow(location, {})
                continue
            text_error = _undecodable(cells, encoding)
            if text_error:
                yield RawRow(location, {}, error=text_error)
                continue
            values: dict[str, str | None] = {}
            for i, name in enumerate(names):
                if name and name not in values:
                    values[name] = cells[i].strip() if i < len(cells) else None
            yield RawRow(location, values)


def _undecodable(cells: list[str], encoding: str) -> str | None:
    for cell in cells:
        try:
            cell.encode("utf-8")
        except UnicodeEncodeError:
            return f"the row has bytes that are not valid {encoding} text"
    return None


