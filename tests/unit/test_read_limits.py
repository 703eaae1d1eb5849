"""Read limits: a workbook zip bomb, an over-long line or record, and an over-long cell never make the reader
hold them in memory; the error names the file (whole-file limits) or the row is rejected (cell limit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile_files import xlsx_zip_bomb
from openpyxl import Workbook

from connector.errors import ExitCode, InputError
from connector.read.formats import ReadLimits, read_rows
from connector.read.profile import load_profile
from connector.read.program import read_program
from connector.read.staging import Staging

SMALL = ReadLimits(max_unpacked_bytes=4 * 2**20, max_cell_chars=100, max_line_bytes=1000)


def workbook(path: Path, rows: list[list[object]], sheet: str = "Contacts") -> Path:
    book = Workbook()
    book.active.title = sheet
    for row in rows:
        book.active.append(row)
    book.save(path)
    return path


def test_a_workbook_zip_bomb_is_refused_before_it_is_unpacked(tmp_path: Path) -> None:
    bomb = xlsx_zip_bomb(tmp_path / "program.xlsx", unpacked_mb=16)
    assert bomb.stat().st_size < 2**20  # a small file...
    with pytest.raises(InputError, match=r"program\.xlsx: the workbook unpacks to 16 MB, more than the limit of "
                                         r"4 MB \(source\.max_unpacked_mb\)") as caught:
        list(read_rows(bomb, sheet="Contacts", limits=SMALL))
    assert caught.value.exit_code == ExitCode.CONFIG_ERROR
    with Staging() as staging, pytest.raises(InputError, match=r"program\.xlsx"):  # also when listing its sheets
        read_program(load_profile("peersync-template"), [bomb], staging, SMALL)


def test_a_workbook_within_the_limit_is_read(tmp_path: Path) -> None:
    path = workbook(tmp_path / "program.xlsx", [["contact_id", "notes"], ["C1", "x" * 100], ["C2", "x" * 101]])
    rows = list(read_rows(path, sheet="Contacts", limits=SMALL))
    assert rows[0].values == {"contact_id": "C1", "notes": "x" * 100} and rows[0].error is None
    assert rows[1].values == {} and rows[1].error == "a cell is longer than 100 characters (source.max_cell_chars)"


def test_csv_line_without_line_breaks_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "contacts.csv"
    path.write_text("contact_id,notes\nC1,ok\nC2," + "x" * 5000, encoding="utf-8")
    rows = read_rows(path, limits=SMALL)
    with pytest.raises(InputError, match=r"contacts\.csv: line 3 is longer than 1,000 characters"):
        list(rows)


def test_csv_field_growing_over_many_lines_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "contacts.csv"
    path.write_text('contact_id,notes\nC1,"' + "short line\n" * 200 + '"\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"contacts\.csv: .*source\.max_line_kb"):
        list(read_rows(path, limits=SMALL))


def test_csv_long_cell_rejects_its_row_only(tmp_path: Path) -> None:
    path = tmp_path / "contacts.csv"
    path.write_text(f"contact_id,notes\nC1,{'x' * 101}\nC2,ok\n", encoding="utf-8")
    first, second = read_rows(path, limits=SMALL)
    assert first.error and "longer than 100 characters" in first.error
    assert second.values == {"contact_id": "C2", "notes": "ok"}


def test_ndjson_long_line_and_json_long_record_are_refused(tmp_path: Path) -> None:
    ndjson = tmp_path / "contacts.ndjson"
    ndjson.write_text(json.dumps({"contact_id": "C1"}) + "\n" + json.dumps({"notes": "x" * 5000}) + "\n",
                      encoding="utf-8")
    with pytest.raises(InputError, match=r"contacts\.ndjson: line 2 is longer than 1,000 characters"):
        list(read_rows(ndjson, limits=SMALL))
    array = tmp_path / "contacts.json"
    array.write_text(json.dumps([{"contact_id": "C1"}, {"notes": "x" * 3_000_000}]), encoding="utf-8")
    with pytest.raises(InputError, match=r"contacts\.json: record 1 is longer than"):
        list(read_rows(array, limits=SMALL))


def test_json_long_value_rejects_its_record(tmp_path: Path) -> None:
    path = tmp_path / "contacts.ndjson"
    path.write_text(json.dumps({"contact_id": "C1", "notes": "x" * 101}) + "\n", encoding="utf-8")
    (row,) = read_rows(path, limits=ReadLimits(max_cell_chars=100))
    assert row.error == "a value is longer than 100 characters (source.max_cell_chars)"
