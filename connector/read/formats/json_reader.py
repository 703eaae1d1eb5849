"""JSON and NDJSON readers. Top-level JSON arrays and NDJSON stream; a nested json_path loads the document."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from connector.errors import InputError
from connector.read.formats.base import DEFAULT_LIMITS, RawRow, ReadLimits, RowLocation

_CHUNK = 1 << 20
# What may still follow a number cut at the end of a chunk ("1e" + "5", "-0." + "25").
_NUMBER_TAIL = re.compile(r"[0-9eE.+-]*")
# A decode error this close to the end of the buffer may just be a record cut by the chunk boundary.
_CUT_MARGIN = 64


def read_ndjson(path: Path, limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[RawRow]:
    """One JSON object per line; blank lines are skipped, bad lines are yielded with an error. A line longer
    than ``limits.max_line_bytes`` stops the read with an InputError."""
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape") as handle:
        for line_number, line in enumerate(iter(lambda: handle.readline(limits.max_line_bytes + 1), ""), start=1):
            if len(line) > limits.max_line_bytes:
                raise InputError(f"{path.name}: line {line_number} is longer than {limits.max_line_bytes:,} "
                                 "characters (source.max_line_kb): fix the file or raise the limit")
            if not line.strip():
                continue
            location = RowLocation(path.name, line_number, unit="line")
            try:
                value = json.loads(line)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, or an integer of over 4300 digits
                yield RawRow(location, {}, error=f"not valid JSON ({_reason(exc)})")
                continue
            yield _as_row(location, value, limits)


def read_json(path: Path, json_path: str | None, limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[RawRow]:
    """Records from a JSON array: the top-level array (streamed, each record at most ``limits.max_line_bytes``)
    or the array at a dotted ``json_path`` (the document is loaded whole: at most ``limits.max_unpacked_bytes``)."""
    if json_path:
        yield from _read_nested(path, json_path, limits)
        return
    yield from _stream_array(path, limits)


def _read_nested(path: Path, json_path: str, limits: ReadLimits) -> Iterator[RawRow]:
    if path.stat().st_size > limits.max_unpacked_bytes:
        raise InputError(f"{path.name}: a JSON document read through json_path is loaded whole, and this one is "
                         f"larger than {limits.max_unpacked_bytes / 2**20:,.0f} MB (source.max_unpacked_mb): "
                         "export a top-level array or NDJSON, or raise the limit")
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too-long integers
        raise InputError(f"{path.name}: not valid JSON ({_reason(exc)})") from exc
    node: Any = document
    for part in json_path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise InputError(f"{path.name}: json_path {json_path!r} not found (missing {part!r})")
        node = node[part]
    if not isinstance(node, list):
        raise InputError(f"{path.name}: json_path {json_path!r} is not an array")
    for index, value in enumerate(node):
        yield _as_row(RowLocation(path.name, index, unit="index"), value, limits)


def _stream_array(path: Path, limits: ReadLimits) -> Iterator[RawRow]:
    """Decode the elements of a top-level array one at a time, reading the file in chunks."""
    decoder = json.JSONDecoder()
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape") as handle:
        buffer = handle.read(_CHUNK)
        pos = _skip_ws(buffer, 0)
        if pos >= len(buffer) or buffer[pos] != "[":
            raise InputError(f"{path.name}: expected a JSON array of records (or set source.json_path)")
        pos += 1
        index = 0
        eof = False
        while True:
            pos = _skip_ws(buffer, pos)
            if pos < len(buffer) and buffer[pos] == ",":
                pos = _skip_ws(buffer, pos + 1)
            if pos < len(buffer) and buffer[pos] == "]":
                return
            try:
                value, end = decoder.raw_decode(buffer, pos)
            except (ValueError, RecursionError) as exc:
                if not eof and _maybe_cut(exc, buffer):
                    if len(buffer) - pos > limits.max_line_bytes:
                        raise InputError(f"{path.name}: record {index} is longer than {limits.max_line_bytes:,} "
                                         "characters (source.max_line_kb): fix the file or raise the limit") from None
                    more = handle.read(_CHUNK)
                    if more:
                        buffer = buffer[pos:] + more
                        pos = 0
                        continue
                    eof = True
                    continue
                # Truncated or broken document: report once at the failing element and stop.
                yield RawRow(RowLocation(path.name, index, unit="index"), {}, error=f"not valid JSON ({_reason(exc)})")
                return
            if not eof and _NUMBER_TAIL.fullmatch(buffer, end):
                # A number at the very end of the buffer may continue in the next chunk: read more first.
                more = handle.read(_CHUNK)
                if more:
                    buffer = buffer[pos:] + more
                    pos = 0
                    continue
                eof = True
            yield _as_row(RowLocation(path.name, index, unit="index"), value, limits)
            index += 1
            pos = end
            if pos > _CHUNK:
                buffer, pos = buffer[pos:], 0


def _maybe_cut(exc: Exception, buffer: str) -> bool:
    """True when a decode error may be due to the record being cut at the end of the buffer (read more then);
    False for a real error well inside the buffer, so a broken file is not read whole into memory."""
    if not isinstance(exc, json.JSONDecodeError):
        return False  # too deeply nested, or an integer of over 4300 digits: more text will not help
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(buffer) - _CUT_MARGIN


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _as_row(location: RowLocation, value: Any, limits: ReadLimits) -> RawRow:
    if not isinstance(value, dict):
        return RawRow(location, {}, error="expected a JSON object for each record")
    if any(isinstance(v, str) and len(v) > limits.max_cell_chars for v in value.values()):
        return RawRow(location, {}, error=f"a value is longer than {limits.max_cell_chars} characters "
                                          "(source.max_cell_chars)")
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return RawRow(location, {}, error="the record has bytes that are not valid UTF-8 text")
    return RawRow(location, value)


def _reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return exc.__class__.__name__
