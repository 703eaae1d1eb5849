"""Property-based tests of the read stage: no input crashes it, and the counts always add up.

Each property writes a program folder, runs :func:`connector.read.program.read_program` through the template profile
(or a variant reading NDJSON/JSON), and checks: nothing but a :class:`PeersyncError` escapes (and for CSV and
NDJSON nothing at all), read = accepted + rejected for every kind, and every non-blank row is counted once.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import tempfile
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openpyxl import Workbook

from connector.errors import InputError, PeersyncError
from connector.identifiers import identifier_value
from connector.model import RecordKind
from connector.read.formats import json_reader, read_rows
from connector.read.profile import Profile, load_profile
from connector.read.program import ReadReport, read_program
from connector.read.staging import Staging

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEMPLATE = load_profile("peersync-template")
CONTACT_COLUMNS = [c for spec in TEMPLATE.records[RecordKind.CONTACT].fields.values() for c in spec.columns_used()]
CONTACT_COLUMNS = list(dict.fromkeys(CONTACT_COLUMNS))

SUPPORTERS = "staff_id,given_name,family_name,title\nS1,Ana,Peña,promotora\n"
ENROLLMENTS = "enrollment_id,mrn,start_date,supporter_id\nE1,M1,2024-01-01,S1\nE2,M2,2024-01-01,S1\n"


def with_contacts_from(pattern: str) -> Profile:
    """The template profile, reading contacts from files matching ``pattern`` instead of contacts*.csv."""
    data = TEMPLATE.model_dump(by_alias=True, exclude_none=True, mode="json")
    data["records"]["contact"]["source"]["files"] = [pattern]
    return Profile.model_validate(data)


NDJSON_PROFILE = with_contacts_from("contacts*.ndjson")
JSON_PROFILE = with_contacts_from("contacts*.json")


def read_folder(profile: Profile, write: Callable[[Path], None], *, allowed: tuple[type[Exception], ...] = ()
                ) -> ReadReport | None:
    """Write a program folder, read it; return the report (None if an allowed whole-file error was raised)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "supporters.csv").write_text(SUPPORTERS, encoding="utf-8")
        (folder / "enrollments.csv").write_text(ENROLLMENTS, encoding="utf-8")
        write(folder)
        with Staging() as staging:
            try:
                report = read_program(profile, [folder], staging)
            except PeersyncError as exc:
                assert isinstance(exc, allowed), f"unexpected {exc.__class__.__name__}: {exc}"
                return None
            problems = list(staging.rejects())
    assert report.balanced(), report.as_dict()
    assert report.read["supporter"] == 1 and report.read["enrollment"] == 2
    for counts in report.as_dict()["kinds"].values():  # type: ignore[union-attr]
        assert counts["read"] == counts["accepted"] + counts["rejected"]
    assert len(problems) >= report.total_rejected  # every rejected row has at least one reason
    return report


# -- CSV ----------------------------------------------------------------------------------------------

CSV_PIECES = st.sampled_from([
    b",", b";", b"\t", b"|", b"\r\n", b"\n", b"\r", b'"', b'""', b" ", b"\x00", b"\xff", b"\xfe", b"\xc3", b"\xa9",
    b"\xc3\xb1", b"\xef\xbb\xbf", b"=1+1", b"E1", b"S1", b"C1", b"phone", b"2024-07-01 10:00", b"45352",
    ",".join(CONTACT_COLUMNS).encode() + b"\n",
])
CSV_BYTES = st.lists(st.one_of(CSV_PIECES, st.binary(max_size=12)), max_size=60).map(b"".join)
PREFIXES = st.sampled_from([b"", codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE,
                            ",".join(CONTACT_COLUMNS).encode() + b"\r\n"])


def non_blank_rows(path: Path) -> tuple[int, int]:
    rows = list(read_rows(path))
    blank = sum(r.is_blank() for r in rows)
    return len(rows) - blank, blank


@SETTINGS
@given(prefix=PREFIXES, body=CSV_BYTES)
def test_arbitrary_bytes_as_a_csv_file(prefix: bytes, body: bytes) -> None:
    counted: dict[str, tuple[int, int]] = {}

    def write(folder: Path) -> None:
        path = folder / "contacts.csv"
        path.write_bytes(prefix + body)
        counted["rows"] = non_blank_rows(path)

    report = read_folder(TEMPLATE, write)
    assert report is not None
    rows, blank = counted["rows"]
    assert report.read["contact"] == rows
    assert report.blank_rows == blank


@SETTINGS
@given(text=st.text(max_size=300), encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "cp1252"]),
       with_header=st.booleans())
def test_arbitrary_text_as_a_csv_file(text: str, encoding: str, with_header: bool) -> None:
    if with_header:
        text = ",".join(CONTACT_COLUMNS) + "\n" + text

    def write(folder: Path) -> None:
        (folder / "contacts.csv").write_bytes(text.encode(encoding, errors="replace"))

    assert read_folder(TEMPLATE, write) is not None


CELLS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=25),
    st.sampled_from(["", " ", "C1", "C2", "E1", "E2", "E404", "S1", "S9", "2024-07-01 10:00", "2024-01-15T08:00:00Z",
                     "45352.5", "0001-01-01", "phone", "Tel", "en persona", "pigeon", "30", "-5", "inf", "1e999999",
                     "emotional;education", "yes", "maybe", "=HYPERLINK(\"http://x\",\"y\")", "a,b", 'say "hi"',
                     "line\nbreak", "cr\ronly", "\t", "\x00", "ñ", "G1;G2", "other"]),
)


@SETTINGS
@given(rows=st.lists(st.lists(CELLS, min_size=len(CONTACT_COLUMNS), max_size=len(CONTACT_COLUMNS)), max_size=25))
def test_arbitrary_rows_under_the_template_headers(rows: list[list[str]]) -> None:
    def write(folder: Path) -> None:
        with (folder / "contacts.csv").open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\r\n")  # quotes every cell holding \r or \n
            writer.writerow(CONTACT_COLUMNS)
            writer.writerows(rows)

    report = read_folder(TEMPLATE, write)
    assert report is not None
    blank = sum(all(not cell.strip() for cell in row) for row in rows)
    assert report.read["contact"] == len(rows) - blank  # every non-blank row is read exactly once
    assert report.blank_rows == blank


# -- NDJSON and JSON ----------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                  st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4)), max_leaves=12)
TEMPLATE_VALUES = st.one_of(JSON_VALUES, CELLS)
CONTACT_OBJECTS = st.dictionaries(st.sampled_from(CONTACT_COLUMNS), TEMPLATE_VALUES, max_size=len(CONTACT_COLUMNS))
RECORDS = st.one_of(CONTACT_OBJECTS, JSON_VALUES)


def is_blank_record(value: Any) -> bool:
    return isinstance(value, dict) and all(v is None or (isinstance(v, str) and not v.strip())
                                           for v in value.values())


@SETTINGS
@given(lines=st.lists(st.one_of(RECORDS.map(lambda v: ("json", v)),
                                st.text(st.characters(blacklist_characters="\r\n"), max_size=30).map(
                                    lambda t: ("raw", t))), max_size=25),
       ascii_only=st.booleans())
def test_arbitrary_json_values_as_ndjson_lines(lines: list[tuple[str, Any]], ascii_only: bool) -> None:
    texts = [json.dumps(v, ensure_ascii=ascii_only) if kind == "json" else v for kind, v in lines]

    def write(folder: Path) -> None:
        (folder / "contacts.ndjson").write_text("\n".join(texts) + "\n", encoding="utf-8", errors="surrogatepass")

    report = read_folder(NDJSON_PROFILE, write)
    assert report is not None
    expected = 0
    for (kind, value), text in zip(lines, texts, strict=True):
        if not text.strip():
            continue  # blank lines are skipped
        if kind == "json" and is_blank_record(value):
            continue  # {} or all-empty objects are blank rows
        expected += 1
    assert report.read["contact"] == expected


@SETTINGS
@given(records=st.lists(RECORDS, max_size=15), chunk=st.integers(min_value=1, max_value=48),
       indent=st.sampled_from([None, 0, 2]))
def test_arbitrary_json_arrays_stream_at_any_chunk_size(records: list[Any], chunk: int, indent: int | None) -> None:
    text = json.dumps(records, indent=indent)

    def write(folder: Path) -> None:
        (folder / "contacts.json").write_text(text, encoding="utf-8", errors="surrogatepass")

    saved = json_reader._CHUNK
    json_reader._CHUNK = chunk
    try:
        report = read_folder(JSON_PROFILE, write)
    finally:
        json_reader._CHUNK = saved
    assert report is not None
    assert report.read["contact"] == sum(not is_blank_record(r) for r in records)


@SETTINGS
@given(records=st.lists(CONTACT_OBJECTS, min_size=1, max_size=6), cut=st.integers(min_value=0),
       chunk=st.sampled_from([1, 3, 7, 1 << 20]))
def test_truncated_json_arrays_never_crash(records: list[Any], cut: int, chunk: int) -> None:
    text = json.dumps(records)
    text = text[: cut % (len(text) + 1)]

    def write(folder: Path) -> None:
        (folder / "contacts.json").write_text(text, encoding="utf-8", errors="surrogatepass")

    saved = json_reader._CHUNK
    json_reader._CHUNK = chunk
    try:
        read_folder(JSON_PROFILE, write, allowed=(InputError,))  # only "not a JSON array" (e.g. empty file)
    finally:
        json_reader._CHUNK = saved


# -- Excel ----------------------------------------------------------------------------------------------

XLSX_CELLS = st.one_of(
    st.none(), st.integers(min_value=-10**12, max_value=10**12), st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(), st.datetimes(min_value=datetime(1900, 3, 1), max_value=datetime(9999, 1, 1)),
    st.dates(min_value=date(1900, 3, 1)),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20).filter(lambda t: not t.startswith("=")),
    st.sampled_from(["C1", "E1", "S1", "phone", "2024-07-01 10:00", "45352", " "]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.lists(XLSX_CELLS, max_size=len(CONTACT_COLUMNS) + 2), max_size=12))
def test_arbitrary_excel_cells_under_the_template_headers(rows: list[list[Any]]) -> None:
    def write(folder: Path) -> None:
        workbook = Workbook()
        sheet = workbook.active
        sheet.title = "Contacts"
        sheet.append(CONTACT_COLUMNS)
        for row in rows:
            sheet.append(row)
        workbook.save(folder / "program.xlsx")

    report = read_folder(TEMPLATE, write)
    assert report is not None


# -- identifiers ------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(a=st.text(min_size=1, max_size=20), b=st.text(min_size=1, max_size=20))
def test_identifier_values_are_safe_and_injective(a: str, b: str) -> None:
    for value in (identifier_value(a), identifier_value(b)):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", value)
    assert (identifier_value(a) == identifier_value(b)) == (a == b)


# -- ingest, every kind -------------------------------------------------------------------------------

KIND_COLUMNS = {kind: list(dict.fromkeys(c for spec in TEMPLATE.records[kind].fields.values()
                                         for c in spec.columns_used()))
                for kind in TEMPLATE.records}
ANY_CELL = st.one_of(TEMPLATE_VALUES, XLSX_CELLS, st.integers(), st.floats())


@SETTINGS
@given(data=st.data(), kind=st.sampled_from(sorted(TEMPLATE.records)))
def test_no_cell_value_crashes_ingest_for_any_kind(data: st.DataObject, kind: RecordKind) -> None:
    from connector.read.convert import RowConverter, RowRejected
    from connector.read.formats.base import RawRow, RowLocation
    from connector.read.staging import record_json

    values = data.draw(st.dictionaries(st.sampled_from(KIND_COLUMNS[kind]), ANY_CELL))
    try:
        record = RowConverter(TEMPLATE, kind).convert(RawRow(RowLocation("x.csv", 2), values))
    except RowRejected as rejected:
        assert rejected.problems and all(isinstance(p.value, str) and p.reason for p in rejected.problems)
        return
    assert record_json(record)  # what staging stores
