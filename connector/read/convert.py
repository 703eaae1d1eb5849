"""Ingest: turn one raw row into a validated source record, as the mapping profile says. Pure: no I/O.

Every failure becomes a :class:`FieldProblem` naming the field, the (masked) value and the reason, so the
row can be rejected and reported while all other rows go on.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from connector.model import (
    ID_FIELDS,
    RECORD_MODELS,
    SENSITIVE_FIELDS,
    GoalTarget,
    RecordKind,
    SourceRecord,
)
from connector.read.elements import derived_elements
from connector.read.formats.base import RawRow
from connector.read.profile import (
    GOAL_TARGET_FIELDS,
    FieldSpec,
    Profile,
    RecordSpec,
    all_match,
    field_type,
    is_list_type,
)
from connector.read.values import cell_text, value_at

_EXCEL_EPOCH = datetime(1899, 12, 30)
_EXCEL_SERIAL = re.compile(r"^\d{4,6}(\.\d+)?$")
_ROW = "(row)"
_SLOW = object()  # a fast reader's answer for "take the general path"
_NO_VALUE = "\x00no value"  # a code table's "null" entry: the spelling means the field has no value
# strptime formats whose matches datetime.fromisoformat parses to the same value, with the exact shape it needs
_ISO_SHAPES = {
    fmt: re.compile(shape, re.ASCII)
    for fmt, shape in {
        "%Y-%m-%d": r"\d{4}-\d{2}-\d{2}\Z",
        "%Y-%m-%d %H:%M": r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}\Z",
        "%Y-%m-%d %H:%M:%S": r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\Z",
        "%Y-%m-%dT%H:%M": r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}\Z",
        "%Y-%m-%dT%H:%M:%S": r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\Z",
    }.items()
}
_ISO_SAMPLES = {fmt: datetime(2000, 1, 1).strftime(fmt) for fmt in _ISO_SHAPES}  # text of each shape


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """Why a row was rejected: the field, the value as shown in reports (masked if sensitive), the reason."""

    field: str
    value: str
    reason: str


class RowRejected(Exception):
    """A row failed; carries every problem found in it."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.reason}" for p in problems))
        self.problems = problems


def show_value(field: str, value: Any) -> str:
    """The value as it may appear in a rejects report: masked for patient data, free text and identifiers
    (the file and row locate the record), shortened otherwise."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else cell_text(value)
    if field in SENSITIVE_FIELDS or field.endswith(("_id", "_ids")):
        return f"<masked: {len(text)} characters>"
    return text if len(text) <= 80 else text[:77] + "..."


class RowConverter:
    """Converts raw rows of one record kind with one profile. Build once per kind; call per row."""

    def __init__(self, profile: Profile, kind: RecordKind) -> None:
        self.profile = profile
        self.kind = kind
        self.spec: RecordSpec = profile.records[kind]
        self.model = RECORD_MODELS[kind]
        self.zone = ZoneInfo(profile.program.timezone)
        opts = profile.options
        self.true_values = {v.casefold() for v in opts.true_values}
        self.false_values = {v.casefold() for v in opts.false_values}
        self.earliest = date.fromisoformat(opts.earliest_date)
        self.latest = date.fromisoformat(opts.latest_date)
        self.types = {name: field_type(kind, name) for name in self.spec.fields}
        self.lists = {name: _is_list(ftype) for name, ftype in self.types.items()}
        # (code table, enum, text as written) -> code or None: the same few spellings recur on every row
        self._codes: dict[tuple[str | None, type[StrEnum], str], str | None] = {}
        # (field, spec, fast reader or None): convert() tries the fast reader first, _field() when it has none
        # or it answers _SLOW
        self._fields = [(name, spec, self._fast_reader(name, spec)) for name, spec in self.spec.fields.items()]

    def missing_columns(self, header: set[str]) -> dict[str, str]:
        """Field -> the column it needs that the file lacks (reported once per file, rejected per row)."""
        missing = {}
        for name, spec in self.spec.fields.items():
            for column in spec.columns_used():
                if column not in header and "." not in column:
                    missing[name] = column
            if spec.checkboxes is not None and not any(h.startswith(spec.checkboxes.prefix) for h in header):
                missing[name] = spec.checkboxes.prefix + "*"  # a mistyped prefix would otherwise read as "none checked"
        return missing

    def received_at(self, row: RawRow) -> str | None:
        """When this copy of the record was received (UTC ISO), read from the profile's `duplicates.by`
        column as a date-time; None without a policy or when the cell is empty or unreadable."""
        policy = self.spec.duplicates
        if policy is None:
            return None
        raw = value_at(row.values, policy.by)
        if _is_empty(raw):
            return None
        try:
            when = self._datetime(FieldSpec(column=policy.by), raw)
        except ValueError:
            return None
        return when.astimezone(UTC).isoformat()

    def source_key(self, row: RawRow) -> str | None:
        """The row's record id as written (best effort, for rows that fail): None when unreadable."""
        spec = self.spec.fields.get(ID_FIELDS[self.kind])
        if spec is None or row.error:
            return None
        value = _raw(spec, row.values)
        return None if _is_empty(value) else cell_text(value)

    def convert(self, row: RawRow) -> SourceRecord:
        """Return the validated record, or raise RowRejected listing every problem in the row."""
        if row.error:
            raise RowRejected([FieldProblem(_ROW, "", row.error)])
        values: dict[str, Any] = {}
        original: dict[str, str] = {}
        problems: list[FieldProblem] = []
        cells = row.values
        for name, spec, fast in self._fields:
            if fast is not None:
                value = fast(cells)
                if value is not _SLOW:
                    if value is not None:
                        values[name] = value
                    continue
            try:
                value = self._field(name, spec, cells, original)
            except ValueError as exc:
                problems.append(FieldProblem(name, show_value(name, _raw(spec, row.values)), str(exc)))
                continue
            if value is not None:
                values[name] = value
        if self.kind is RecordKind.GOAL:
            self._assemble_target(values, problems)
        if self.kind is RecordKind.CONTACT and not values.get("essential_elements"):
            values["essential_elements"] = derived_elements(
                support_types=values.get("support_types", ()), goal_ids=values.get("goal_ids", ()),
                purpose=values.get("purpose"), outcome=values.get("outcome"), element_rules=self.profile.element_rules)
        if original:
            values["original_text"] = original
        if problems:
            raise RowRejected(problems)
        try:
            return self.model.model_validate(values)
        except ValidationError as exc:
            raise RowRejected(_validation_problems(exc, values)) from None

    # -- fast readers --------------------------------------------------------------------------------------

    def _fast_reader(self, name: str, spec: FieldSpec) -> Callable[[dict[str, Any]], Any] | None:
        """A reader for the common case of a field read from one column holding text (CSV, most JSON): the
        same value _field() returns, or _SLOW for anything else (other cell types, unknown codes, defaults,
        values _field() would reject), which convert() then sends down the general path. None when the field
        has no fast case. tests/unit/test_ingest_fast.py checks both paths agree."""
        if spec.column is None or spec.checkboxes is not None or spec.when is not None:
            return None
        ftype = self.types.get(name, str)
        is_list = _is_list(ftype)
        item = self._fast_item(spec, typing.get_args(ftype)[0] if is_list else ftype)
        if item is None:
            return None
        column = spec.column
        empty: object = () if is_list else None
        if spec.default is not None:
            empty = _SLOW
        if not is_list:
            def read_one(cells: dict[str, Any]) -> Any:
                raw = cells.get(column, _SLOW)
                if type(raw) is not str:
                    return _SLOW
                return item(raw) if raw.strip() else empty
            return read_one

        separator = spec.split or self.profile.options.list_separator

        def read_list(cells: dict[str, Any]) -> Any:
            raw = cells.get(column, _SLOW)
            if type(raw) is not str:
                return _SLOW
            if not raw.strip():
                return empty
            out = []
            for part in raw.split(separator):
                if part.strip():
                    value = item(part)
                    if value is _SLOW:
                        return _SLOW
                    out.append(value)
            return tuple(dict.fromkeys(out))
        return read_list

    def _fast_item(self, spec: FieldSpec, ftype: Any) -> Callable[[str], Any] | None:
        """Converter of one non-blank text value of type ``ftype``, or None when the type has no fast case."""
        if ftype is str:
            return str.strip
        if isinstance(ftype, type) and issubclass(ftype, StrEnum):
            memo, table = self._codes, spec.codes

            def code(raw: str) -> Any:
                found = memo.get((table, ftype, raw.strip()))
                # unseen, unknown or "no value": _code() decides (and memoises)
                return _SLOW if found is None or found == _NO_VALUE else found
            return code
        if ftype is bool:
            truthy = {v.casefold() for v in spec.true_values} if spec.true_values else self.true_values
            falsy = None if spec.true_values else self.false_values

            def boolean(raw: str) -> Any:
                text = raw.strip().casefold()
                if text in truthy:
                    return True
                return False if falsy is None or text in falsy else _SLOW
            return boolean
        if ftype is int:
            def whole(raw: str) -> Any:
                text = raw.strip()
                return int(text) if text.isdigit() and text.isascii() and len(text) <= 15 else _SLOW
            return whole
        if ftype is datetime or ftype is date:
            formats = spec.formats or (self.profile.options.datetime_formats if ftype is datetime
                                       else self.profile.options.date_formats)
            return self._fast_datetime(formats, as_date=ftype is date)
        return None

    def _fast_datetime(self, formats: list[str], *, as_date: bool) -> Callable[[str], Any] | None:
        """ISO-shaped text under an ISO format: ``datetime.fromisoformat`` gives what strptime would, at a
        fraction of the cost. As in _parse_datetime(), the first format the text may match decides: an ISO
        format is taken only for text of its exact shape and when no format before it may match such text
        (decided once, here, from a sample of the shape), so the answer is the one _parse_datetime() gives."""
        shapes = []
        for k, fmt in enumerate(formats):
            shape = _ISO_SHAPES.get(fmt)
            if shape is None:
                continue
            sample = _ISO_SAMPLES[fmt]
            earlier = formats[:k]
            if any(_may_match(sample, f) or any(ch.isdigit() or not ch.isascii() for ch in f) for f in earlier):
                continue  # an earlier format may win for some text of this shape: leave it to the general path
            shapes.append(shape)
        if not shapes:
            return None
        zone, earliest, latest = self.zone, self.earliest, self.latest

        def parse(raw: str) -> Any:
            text = raw.strip()
            for shape in shapes:
                if not shape.match(text):
                    continue
                try:
                    value = datetime.fromisoformat(text)
                except ValueError:
                    return _SLOW
                if not earliest <= value.date() <= latest:
                    return _SLOW  # _field() raises the error that names the range
                if as_date:
                    return value.date()
                return value.replace(tzinfo=zone)
            return _SLOW
        return parse

    # -- one field -------------------------------------------------------------------------------------

    def _field(self, name: str, spec: FieldSpec, row: dict[str, Any], original: dict[str, str]) -> Any:
        ftype = self.types.get(name, str)
        if not all_match(spec.when, row):
            return () if _is_list(ftype) else None  # `when` does not hold: the field has no value in this row
        if spec.checkboxes is not None:
            return self._checkboxes(name, spec, row, ftype, original)
        raw = _raw(spec, row)
        is_list = self.lists.get(name)
        if is_list is None:
            is_list = _is_list(ftype)
        if _is_empty(raw):
            raw = spec.default
            if _is_empty(raw):
                return () if is_list else None
        if is_list:
            separator = spec.split or self.profile.options.list_separator
            parts = raw if isinstance(raw, list) else [p for p in cell_text(raw).split(separator) if p.strip()]
            item_type = typing.get_args(ftype)[0]
            items = (self._scalar(name, spec, p, item_type, original) for p in parts)
            return tuple(dict.fromkeys(item for item in items if item is not None))
        return self._scalar(name, spec, raw, ftype, original)

    def _scalar(self, name: str, spec: FieldSpec, raw: Any, ftype: Any, original: dict[str, str]) -> Any:
        if ftype is str and type(raw) is str:
            return raw.strip()  # the common case (text cells): skip the type checks below
        if isinstance(ftype, type) and issubclass(ftype, StrEnum):
            return self._code(name, spec, raw, ftype, original)
        if ftype is bool:
            return self._bool(spec, raw)
        if ftype is datetime:
            return self._datetime(spec, raw)
        if ftype is date:
            return self._date(spec, raw)
        if ftype is int:
            return _int(raw)
        if ftype is Decimal:
            return _decimal(raw)
        # Excel stores ids typed as numbers as floats (1042.0 -> "1042"); JSON false is "false", not "False"
        return cell_text(raw)

    def _code(self, name: str, spec: FieldSpec, raw: Any, enum: type[StrEnum],
              original: dict[str, str]) -> str | None:
        text = cell_text(raw)
        memo_key = (spec.codes, enum, text)
        if memo_key in self._codes:
            code = self._codes[memo_key]
        else:
            table = self.profile.code_tables.get(spec.codes) if spec.codes else None
            code = _lookup_code(text, enum, _table_key(self.profile, spec.codes) if table else None)
            if len(self._codes) < 10_000:  # bounded: free-text codes must not grow it without limit
                self._codes[memo_key] = code
        if code == _NO_VALUE:
            return None
        if code is not None:
            return code
        policy = spec.unknown or self.profile.options.unknown_codes
        if policy == "other" and "other" in enum._value2member_map_:
            original[name] = f"{original[name]}; {text}" if name in original else text  # keep every spelling
            return "other"
        allowed = ", ".join(e.value for e in enum)
        raise ValueError(f"unknown code {text!r} (allowed: {allowed}; or add it to a code table in the profile)")

    def _checkboxes(self, name: str, spec: FieldSpec, row: dict[str, Any], ftype: Any, original: dict[str, str]) -> Any:
        boxes = spec.checkboxes
        assert boxes is not None
        item_type = typing.get_args(ftype)[0] if _is_list(ftype) else ftype
        codes = []
        for suffix, code in boxes.options.items():
            if self._bool(spec, row.get(boxes.prefix + suffix)):
                codes.append(self._scalar(name, spec, code, item_type, original))
        return tuple(dict.fromkeys(c for c in codes if c is not None))

    def _bool(self, spec: FieldSpec, raw: Any) -> bool:
        if isinstance(raw, bool):
            return raw
        if raw is None:
            return False
        if isinstance(raw, (int, float)):
            return raw != 0
        text = cell_text(raw).casefold()
        truthy = {v.casefold() for v in spec.true_values} if spec.true_values else self.true_values
        if text in truthy:
            return True
        if spec.true_values or text in self.false_values:
            return False
        raise ValueError(f"not a yes/no value: {cell_text(raw)[:40]!r}")

    def _date(self, spec: FieldSpec, raw: Any) -> date:
        if isinstance(raw, datetime):
            value = raw.date()
        elif isinstance(raw, date):
            value = raw
        else:
            value = self._parse_datetime(spec, raw, self.profile.options.date_formats).date()
        return self._plausible(value)

    def _datetime(self, spec: FieldSpec, raw: Any) -> datetime:
        if isinstance(raw, datetime):
            value = raw
        elif isinstance(raw, date):
            value = datetime(raw.year, raw.month, raw.day)
        else:
            value = self._parse_datetime(spec, raw, self.profile.options.datetime_formats)
        if value.tzinfo is None:
            value = value.replace(tzinfo=self.zone)  # local program time; DST handled by zoneinfo
        self._plausible(value.date())
        return value

    def _parse_datetime(self, spec: FieldSpec, raw: Any, defaults: list[str]) -> datetime:
        text = str(raw).strip()
        if isinstance(raw, (int, float)) or _EXCEL_SERIAL.match(text):
            return _from_excel_serial(raw if isinstance(raw, (int, float)) else float(text))
        for fmt in spec.formats or defaults:
            if not _may_match(text, fmt):
                continue  # strptime would fail (a literal of the format is missing): skip its costly exception
            try:
                return datetime.strptime(text, fmt)
            except ValueError:
                continue
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            formats = ", ".join(spec.formats or defaults)
            raise ValueError(f"not a date in an expected format ({formats})") from None

    def _plausible(self, value: date) -> date:
        if not self.earliest <= value <= self.latest:
            raise ValueError(f"date {value.isoformat()} is outside {self.earliest} .. {self.latest}")
        return value

    def _assemble_target(self, values: dict[str, Any], problems: list[FieldProblem]) -> None:
        flat = {f: values.pop(f) for f in GOAL_TARGET_FIELDS if f in values}
        incomplete = target_problem(set(flat))
        if incomplete is not None:
            problems.append(FieldProblem(incomplete[0], "", incomplete[1]))
            return
        if not flat:
            return
        try:
            values["target"] = GoalTarget(
                measure=flat["target_measure"],
                comparator=flat.get("target_comparator", "="),
                value=flat["target_value"],
                unit=flat.get("target_unit"),
            )
        except ValidationError as exc:
            for err in exc.errors():
                field = "target_" + str(err["loc"][0]) if err["loc"] else "target"
                problems.append(FieldProblem(field, show_value(field, flat.get(field)), err["msg"]))


# -- helpers -------------------------------------------------------------------------------------------


def target_problem(given: set[str]) -> tuple[str, str] | None:
    """(field, reason) when the goal target fields in ``given`` do not make a target; None when they do or
    none is given. A target needs a measure and a value; the comparator defaults to `=` and the unit to the
    measure's usual one (HbA1c `%`)."""
    if not given:
        return None
    extras = " and ".join(name for field, name in (("target_comparator", "comparator"), ("target_unit", "unit"))
                          if field in given)
    if "target_measure" in given and "target_value" in given:
        return None
    if "target_value" in given:
        return "target_measure", "a target value was given without a measure"
    if "target_measure" in given:
        with_extras = f" (only a {extras})" if extras else ""
        return "target_value", f"a target measure was given without a value{with_extras}"
    return "target_value", (f"a target {extras} was given without a measure or value (give them only when "
                            "the value column has a value: `when: {column: ..., present: true}`)")


def _raw(spec: FieldSpec, row: dict[str, Any]) -> Any:
    if not all_match(spec.when, row):
        return None
    if spec.column is not None:
        return value_at(row, spec.column)
    if spec.const is not None:
        return spec.const
    if spec.template is not None:
        parts = {}
        for column in re.findall(r"{([^{}]+)}", spec.template):
            value = value_at(row, column)
            if _is_empty(value):
                return None  # an id built from an empty part is no id
            parts[column] = cell_text(value)
        return re.sub(r"{([^{}]+)}", lambda m: parts[m.group(1)], spec.template)
    return None


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or value == []


_is_list = is_list_type


def _int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("not a whole number")  # noqa: TRY004 - a bad cell value, reported like any other
    if isinstance(raw, int):
        return raw
    try:
        number = Decimal(str(raw).strip())
    except InvalidOperation:
        raise ValueError("not a whole number") from None
    if not number.is_finite() or number != number.to_integral_value():
        raise ValueError("not a whole number")
    if number.adjusted() > 15:  # int() of 1e999999999 would hang; no count in a source record is this large
        raise ValueError("number too large")
    return int(number)


def _decimal(raw: Any) -> Decimal:
    try:
        value = Decimal(str(raw).strip().replace(",", "."))
    except InvalidOperation:
        raise ValueError("not a number") from None
    if not value.is_finite():
        raise ValueError("not a finite number")
    return value


def _from_excel_serial(serial: float) -> datetime:
    if not 1 <= serial < 2958466:  # Excel's valid range: 1900-01-01 .. 9999-12-31
        raise ValueError("not a valid Excel date serial")
    return _EXCEL_EPOCH + timedelta(days=serial)


@lru_cache(maxsize=256)
def _format_literals(fmt: str) -> tuple[tuple[str, int], ...]:
    """The literal characters a strptime format needs in the text, with counts (whitespace, which strptime
    matches loosely, left out; ASCII letters lower-cased: strptime matches literals ignoring case)."""
    counts: dict[str, int] = {}
    i = 0
    while i < len(fmt):
        ch = fmt[i]
        if ch == "%":
            if fmt[i + 1:i + 2] == "%":
                counts["%"] = counts.get("%", 0) + 1
            i += 2  # a directive: matches text, requires no literal
            continue
        if not ch.isspace():
            key = ch.lower() if ch.isascii() else ch
            counts[key] = counts.get(key, 0) + 1
        i += 1
    return tuple(counts.items())


def _may_match(text: str, fmt: str) -> bool:
    """False only when ``datetime.strptime(text, fmt)`` must fail: the text lacks a literal of the format.

    Every literal character of a format is matched by itself (ignoring case), so the text holds at least as
    many of it. Letters are checked only in ASCII text (non-ASCII case folding has exotic equivalents)."""
    ascii_text = text.isascii()
    lowered = text.lower() if ascii_text else text
    for ch, count in _format_literals(fmt):
        if ch.isalpha() and not ascii_text:
            continue
        if lowered.count(ch) < count:
            return False
    return True


def _normalise(text: str) -> str:
    return re.sub(r"[\s_]+", "-", text.strip().casefold())


@lru_cache(maxsize=256)
def _enum_index(enum: type[StrEnum]) -> dict[str, str]:
    return {_normalise(e.value): e.value for e in enum}


# id(profile) -> (profile, tables). The profile is kept so its id cannot be reused by another profile while
# the entry exists (a freed profile's id is often reused: keyed by id alone, a new profile got old tables).
_TABLE_CACHE: dict[int, tuple[Profile, dict[str, dict[str, str]]]] = {}


def _table_key(profile: Profile, name: str | None) -> dict[str, str] | None:
    """The normalised spelling -> code index of a code table (built once per profile)."""
    if name is None:
        return None
    cached = _TABLE_CACHE.get(id(profile))
    if cached is None or cached[0] is not profile:
        if len(_TABLE_CACHE) >= 32:  # bounded: long-running processes load profiles again and again
            _TABLE_CACHE.clear()
        tables = {
            table: {
                _normalise(str(s)): _NO_VALUE if code is None else code
                for code, spellings in entries.items()
                for s in ([] if code is None else [code]) + spellings
            }
            for table, entries in profile.code_tables.items()
        }
        cached = _TABLE_CACHE[id(profile)] = (profile, tables)
    return cached[1].get(name)


def _lookup_code(text: str, enum: type[StrEnum], table: dict[str, str] | None) -> str | None:
    key = _normalise(text)
    if table is not None and key in table:
        if table[key] == _NO_VALUE:
            return _NO_VALUE
        key = _normalise(table[key])
    return _enum_index(enum).get(key)


def _validation_problems(exc: ValidationError, values: dict[str, Any]) -> list[FieldProblem]:
    problems = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else _ROW
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = "required value is missing"
        elif err["type"] == "string_pattern_mismatch":
            message = "contains characters that are not allowed"
        problems.append(FieldProblem(field, show_value(field, values.get(field)), message))
    return problems
