"""CSV reader: encoding and delimiter detection, BOMs, Excel exports, quoted multi-line cells."""

from __future__ import annotations

import codecs
import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from connector.errors import InputError
from connector.read.formats.base import DEFAULT_LIMITS, RawRow, ReadLimits, RowLocation

if TYPE_CHECKING:
    from _csv import Reader as _csv_reader

_SAMPLE_BYTES = 256 * 1024
_DELIMITERS = (",", ";", "\t", "|")

# Long notes must not crash the reader: cells are bounded by ReadLimits (a longer cell rejects its row), and
# a field that keeps growing over many lines by the line limit, set per file in read_csv().
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _escape_undecodable(exc: UnicodeError) -> tuple[str, int]:
    """Like surrogateescape, but also for bytes below 0x80 (a cut UTF-16 code unit), which surrogateescape
    refuses: every undecodable byte becomes a lone surrogate, which :func:`_undecodable` then reports."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "".join(chr(0xDC00 + b) for b in exc.object[exc.start : exc.end]), exc.end


_ESCAPE = "peersync-escape"
codecs.register_error(_ESCAPE, _escape_undecodable)


def detect_encoding(sample: bytes) -> str:
    """Pick an encoding from a byte sample: BOMs first, then UTF-8, else Windows-1252 (Excel's legacy export)."""
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    # A multi-byte character cut at the end of the sample is still UTF-8: the incremental decoder keeps it back.
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(sample, final=False)
    undecodable = sum(1 for ch in text if "\udc80" <= ch <= "\udcff")
    if not undecodable:
        return "utf-8"
    # Windows-1252 text practically never forms valid UTF-8 multi-byte sequences; a UTF-8 file with a few
    # corrupt bytes does. Stay with UTF-8 then, so only the corrupt rows are rejected (no silent mojibake).
    multibyte = sum(1 for ch in text if ord(ch) > 0x7F) - undecodable
    return "utf-8" if multibyte else "cp1252"


def detect_delimiter(header_line: str) -> str:
    """The candidate delimiter that occurs most often in the header line (headers rarely contain one)."""
    counts = {d: header_line.count(d) for d in _DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def read_csv(path: Path, limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[RawRow]:
    """Stream a CSV file's rows as dicts keyed by the (trimmed) header names. A line longer than
    ``limits.max_line_bytes`` stops the read with an InputError; a row with a longer cell than
    ``limits.max_cell_chars`` is yielded with an error (rejected)."""
    with path.open("rb") as raw:
        sample = raw.read(_SAMPLE_BYTES)
    encoding = detect_encoding(sample)
    # Undecodable bytes later in the file surface per row (that row is rejected), not as a crash.
    with path.open("r", encoding=encoding, errors=_ESCAPE, newline="") as handle:
        lines = _bounded_lines(handle, path, limits.max_line_bytes)
        first = next(lines, "")
        while first and not first.strip():  # blank lines before the header
            first = next(lines, "")
        delimiter = detect_delimiter(first)
        handle.seek(0)
        previous_limit = csv.field_size_limit(limits.max_line_bytes)
        try:
            yield from _rows(csv.reader(_bounded_lines(handle, path, limits.max_line_bytes), delimiter=delimiter),
                             path, encoding, limits)
        except csv.Error as exc:  # a quoted field that grew past the limit over many lines
            raise InputError(f"{path.name}: {exc} (a cell over {limits.max_line_bytes:,} characters, "
                             "source.max_line_kb): fix the file or raise the limit") from None
        finally:
            csv.field_size_limit(previous_limit)


def _bounded_lines(handle: TextIO, path: Path, limit: int) -> Iterator[str]:
    """The file's lines, never reading more than ``limit`` characters for one (a file without line breaks
    must not be read whole into memory)."""
    number = 0
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit:
            raise InputError(f"{path.name}: line {number} is longer than {limit:,} characters (source.max_line_kb): "
                             "not a CSV export, or damaged; fix the file or raise the limit")
        yield line


def _starting_lines(reader: _csv_reader) -> Iterator[tuple[int, list[str]]]:
    """Each row with the file line it starts on (``line_num`` counts the lines read so far, so it is taken
    before the row is read: a quoted cell may span several lines)."""
    while True:
        start = reader.line_num + 1
        cells = next(reader, None)
        if cells is None:
            return
        yield start, cells


def _rows(reader: _csv_reader, path: Path, encoding: str, limits: ReadLimits) -> Iterator[RawRow]:
    """The rows after the header (see read_csv)."""
    row_number = 0
    numbered = _starting_lines(reader)
    for _line, header in numbered:  # the header is the first row with a non-blank cell, as in the Excel reader
        row_number += 1
        if any(h.strip() for h in header):
            break
    else:
        return
    names = [h.strip().lstrip("\ufeff") for h in header]
    columns = list({name: i for i, name in reversed(list(enumerate(names))) if name}.items())  # first of a name
    columns.sort(key=lambda c: c[1])
    # the common header (every name present and distinct): a row's cells zip straight onto it
    plain = len(columns) == len(names)
    cut_off = not _ends_with_line_break(path)
    following = next(numbered, None)
    while following is not None:
        (line, cells), following = following, next(numbered, None)
        row_number += 1
        location = RowLocation(path.name, row_number, line=line)
        if not cells:
            yield RawRow(location, {})
            continue
        if following is None and cut_off and len(cells) < len(names):
            # The file ends inside this row (no final line break, cells missing): it was cut off, e.g. a copy
            # or an export that did not finish. What is there may itself be cut: reject the row.
            yield RawRow(location, {}, error=f"the file ends in the middle of this row ({len(cells)} of "
                                             f"{len(names)} cells): it looks cut off")
            continue
        text_error = _undecodable(cells, encoding)
        if not text_error and max(map(len, cells)) > limits.max_cell_chars:
            text_error = f"a cell is longer than {limits.max_cell_chars} characters (source.max_cell_chars)"
        if text_error:
            yield RawRow(location, {}, error=text_error)
            continue
        if plain and len(cells) == len(names):
            values: dict[str, str | None] = dict(zip(names, map(str.strip, cells), strict=True))
        elif len(cells) >= len(names):
            values = {name: cells[i].strip() for name, i in columns}
        else:  # a short row: the missing cells are None
            values = {name: cells[i].strip() if i < len(cells) else None for name, i in columns}
        yield RawRow(location, values)


def _ends_with_line_break(path: Path) -> bool:
    """True when the file's last bytes are a line break (in any of the encodings read here)."""
    with path.open("rb") as raw:
        raw.seek(max(0, path.stat().st_size - 4))
        tail = raw.read()
    return tail.endswith((b"\n", b"\r", b"\n\x00", b"\r\x00"))


def _undecodable(cells: list[str], encoding: str) -> str | None:
    text = "".join(cells)
    if text.isascii():
        return None  # the common case: no escaped byte can be in it
    try:
        text.encode("utf-8")  # fails on the surrogates that stand for undecodable bytes
    except UnicodeEncodeError:
        return f"the row has bytes that are not valid {encoding} text"
    return None


