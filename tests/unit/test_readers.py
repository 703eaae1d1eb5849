"""Readers: every format, the messy files programs really send, and row/line numbering.

Numbering rules under test: CSV and Excel use spreadsheet numbering (the header is row 1, blank rows count,
a quoted multi-line cell is one row); NDJSON uses 1-based physical lines; JSON uses the 0-based array index.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
import tracemalloc
import zipfile
from datetime import date, datetime
from pathlib import Path

import pytest
from openpyxl import Workbook

from connector.errors import InputError, PeersyncError
from connector.read.formats import RawRow, json_reader, read_rows, sheet_names
from connector.read.formats.csv_reader import detect_delimiter, detect_encoding


def rows_of(path: Path, **kwargs: object) -> list[RawRow]:
    return list(read_rows(path, **kwargs))  # type: ignore[arg-type]


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_bytes(data.encode("utf-8"))
    else:
        path.write_bytes(data)
    return path


# -- CSV: encodings ------------------------------------------------------------------------------------


def test_csv_utf8_with_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", codecs.BOM_UTF8 + "contact_id,name\nC1,Peña\n".encode())
    (row,) = rows_of(path)
    assert row.values == {"contact_id": "C1", "name": "Peña"}  # the BOM is not part of the first header
    assert detect_encoding(path.read_bytes()) == "utf-8-sig"


@pytest.mark.parametrize("codec, bom", [("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE)])
def test_csv_utf16_with_bom(tmp_path: Path, codec: str, bom: bytes) -> None:
    # Excel's "Unicode text" export: UTF-16 with a BOM, tab separated.
    text = "contact_id\tname\r\nC1\tPeña\r\nC2\tJosé Núñez\r\n"
    path = write(tmp_path, "c.txt", bom + text.encode(codec))
    rows = rows_of(path)
    assert [r.values for r in rows] == [{"contact_id": "C1", "name": "Peña"},
                                        {"contact_id": "C2", "name": "José Núñez"}]
    assert [r.location.row for r in rows] == [2, 3]


def test_csv_utf16_cut_in_half_does_not_crash(tmp_path: Path) -> None:
    # An odd number of bytes: the last code unit is cut. That row is rejected; the reader goes on.
    text = "contact_id,name\r\nC1,Peña\r\nC2,Ana"
    path = write(tmp_path, "c.csv", codecs.BOM_UTF16_LE + text.encode("utf-16-le")[:-1])
    rows = rows_of(path)
    assert rows[0].values == {"contact_id": "C1", "name": "Peña"} and rows[0].error is None
    assert rows[1].error is not None and "utf-16" in rows[1].error


def test_csv_windows_1252(tmp_path: Path) -> None:
    # Excel's legacy "CSV" export on Windows: no BOM, Windows-1252.
    text = "staff_id;given_name;family_name\r\nS1;Peña;Muñoz\r\nS2;José;“Chema” Núñez\r\n"
    path = write(tmp_path, "s.csv", text.encode("cp1252"))
    assert detect_encoding(path.read_bytes()) == "cp1252"
    rows = rows_of(path)
    assert [r.values["given_name"] for r in rows] == ["Peña", "José"]
    assert rows[1].values["family_name"] == "“Chema” Núñez"
    assert all(r.error is None for r in rows)


def test_csv_invalid_bytes_in_the_middle_of_utf8(tmp_path: Path) -> None:
    data = (
        b"contact_id,name,notes\n"
        + "C1,Peña,ok\n".encode()
        + b"C2,Jos\xff\xfe,broken\n"
        + "C3,Muñoz,ok\n".encode()
    )
    path = write(tmp_path, "c.csv", data)
    rows = rows_of(path)
    assert [r.location.row for r in rows] == [2, 3, 4]
    assert rows[0].values["name"] == "Peña" and rows[0].error is None  # not mojibake ("PeÃ±a")
    assert rows[1].error == "the row has bytes that are not valid utf-8 text" and rows[1].values == {}
    assert rows[2].values["name"] == "Muñoz" and rows[2].error is None


def test_csv_invalid_bytes_after_the_sample(tmp_path: Path) -> None:
    # The encoding is chosen from the first 256 KiB; a corrupt row further down is still only that row.
    filler = "".join(f"C{i},Ana,ok\n" for i in range(30_000))
    data = b"contact_id,name,notes\n" + filler.encode() + b"X1,\xc3(,bad\n" + b"X2,Eva,ok\n"
    path = write(tmp_path, "c.csv", data)
    rows = rows_of(path)
    assert len(rows) == 30_002
    assert rows[-2].error is not None and rows[-2].location.row == 30_002
    assert rows[-1].values == {"contact_id": "X2", "name": "Eva", "notes": "ok"}


def test_detect_encoding_keeps_utf8_when_a_character_is_cut_at_the_sample_end() -> None:
    sample = b"a,b\n" * 10 + "ñ".encode()[:1]
    assert detect_encoding(sample) == "utf-8"
    assert detect_encoding(b"plain ascii") == "utf-8"
    assert detect_encoding("Peña".encode("cp1252")) == "cp1252"


# -- CSV: delimiters, line endings, quoting --------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_csv_delimiters(tmp_path: Path, delimiter: str) -> None:
    text = delimiter.join(["contact_id", "mode", "notes"]) + "\n" + delimiter.join(["C1", "phone", "hi"]) + "\n"
    path = write(tmp_path, "c.csv", text)
    assert detect_delimiter(text.splitlines()[0]) == delimiter
    (row,) = rows_of(path)
    assert row.values == {"contact_id": "C1", "mode": "phone", "notes": "hi"}


def test_csv_semicolon_file_with_commas_in_values(tmp_path: Path) -> None:
    # European Excel: ';' separates, ',' is the decimal mark and appears in notes.
    path = write(tmp_path, "c.csv", "goal_id;target_value;notes\nG1;7,5;less rice, more beans\n")
    (row,) = rows_of(path)
    assert row.values == {"goal_id": "G1", "target_value": "7,5", "notes": "less rice, more beans"}


def test_csv_mixed_line_endings(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", b"id,n\r\n1,a\n2,b\r3,c\r\n4,d")
    rows = rows_of(path)
    assert [(r.location.row, r.values) for r in rows] == [
        (2, {"id": "1", "n": "a"}), (3, {"id": "2", "n": "b"}), (4, {"id": "3", "n": "c"}), (5, {"id": "4", "n": "d"}),
    ]


def test_csv_quoted_multiline_notes_count_as_one_row(tmp_path: Path) -> None:
    text = (
        'contact_id,notes,mode\r\n'
        'C1,"Talked about meals,\r\nthen walking.\nShe said ""I can do this"", twice.",phone\r\n'
        'C2,"one line",video\r\n'
    )
    path = write(tmp_path, "c.csv", text)
    rows = rows_of(path)
    assert rows[0].values["notes"] == 'Talked about meals,\r\nthen walking.\nShe said "I can do this", twice.'
    assert rows[0].values["mode"] == "phone"
    assert [r.location.row for r in rows] == [2, 3]  # the three-line cell is one spreadsheet row
    assert rows[1].values == {"contact_id": "C2", "notes": "one line", "mode": "video"}


def test_csv_rows_carry_the_line_they_start_on(tmp_path: Path) -> None:
    # Notes spanning lines push the editor's line numbers past the row numbers; a row is named by both.
    text = (
        "contact_id,notes,mode\r\n"
        'C1,"Talked about meals,\r\nthen walking.\nShe said it twice.",phone\r\n'
        "\r\n"
        'C2,"two\nlines",video\r\n'
        "C3,,phone\r\n"
    )
    rows = rows_of(write(tmp_path, "c.csv", text))
    assert [(r.location.row, r.location.line) for r in rows] == [(2, 2), (3, 5), (4, 6), (5, 8)]
    assert [str(r.location) for r in rows] == ["c.csv row 2", "c.csv row 3 (line 5)", "c.csv row 4 (line 6)",
                                               "c.csv row 5 (line 8)"]


def test_rows_of_other_formats_have_no_line(tmp_path: Path) -> None:
    path = write(tmp_path, "c.ndjson", '{"contact_id": "C1"}\n')
    (row,) = rows_of(path)
    assert row.location.line is None and str(row.location) == "c.ndjson line 1"


def test_csv_blank_rows_are_yielded_blank_and_numbered(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "id,n\n1,a\n\n , \n,,\n2,b\n")
    rows = rows_of(path)
    assert [r.location.row for r in rows] == [2, 3, 4, 5, 6]
    assert [r.is_blank() for r in rows] == [False, True, True, True, False]
    assert rows[-1].values == {"id": "2", "n": "b"}


def test_csv_blank_lines_before_the_header(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "\n;;\ncontact_id;mode\nC1;phone\n")
    rows = rows_of(path)
    assert [(r.location.row, r.values) for r in rows] == [(4, {"contact_id": "C1", "mode": "phone"})]


def test_csv_extra_and_missing_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "id,n,m\n1,a,b,EXTRA,MORE\n2,a\n3\n")
    rows = rows_of(path)
    assert rows[0].values == {"id": "1", "n": "a", "m": "b"}  # cells beyond the header are ignored
    assert rows[1].values == {"id": "2", "n": "a", "m": None}  # missing cells are None, not ""
    assert rows[2].values == {"id": "3", "n": None, "m": None}
    assert all(r.error is None for r in rows)


def test_csv_stray_whitespace_around_headers_and_values(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "  contact_id , mode\t,notes \n  C1 ,\tphone ,  hello  \n")
    (row,) = rows_of(path)
    assert row.values == {"contact_id": "C1", "mode": "phone", "notes": "hello"}


def test_csv_duplicate_and_empty_header_names(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "id,,id,n\n1,x,2,a\n")
    (row,) = rows_of(path)
    assert row.values == {"id": "1", "n": "a"}  # the first column of a name wins; unnamed columns are dropped


def test_csv_very_long_note(tmp_path: Path) -> None:
    note = ("word, " * 900_000)[:5_000_000]
    text = 'contact_id,notes\nC1,"' + note + '"\nC2,short\n'
    path = write(tmp_path, "c.csv", text)
    rows = rows_of(path)
    assert len(rows[0].values["notes"]) == len(note.strip())
    assert rows[1].values == {"contact_id": "C2", "notes": "short"}
    assert rows[1].location.row == 3


def test_csv_empty_file_and_header_only(tmp_path: Path) -> None:
    assert rows_of(write(tmp_path, "empty.csv", b"")) == []
    assert rows_of(write(tmp_path, "blank.csv", b"\n\r\n \n")) == []
    assert rows_of(write(tmp_path, "header.csv", b"contact_id,mode\r\n")) == []
    assert rows_of(write(tmp_path, "header_bom.csv", codecs.BOM_UTF8 + b"contact_id,mode")) == []


def test_csv_suffixes_tsv_and_txt(tmp_path: Path) -> None:
    for name in ("c.tsv", "c.txt", "C.CSV"):
        (row,) = rows_of(write(tmp_path, name, "a\tb\n1\t2\n"))
        assert row.values == {"a": "1", "b": "2"}


def test_csv_formula_looking_text_is_plain_text(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", 'contact_id,notes\n"=HYPERLINK(""http://x"",""y"")",+1\n')
    (row,) = rows_of(path)
    assert row.values == {"contact_id": '=HYPERLINK("http://x","y")', "notes": "+1"}


# -- JSON ----------------------------------------------------------------------------------------------


def test_json_top_level_array(tmp_path: Path) -> None:
    data = [{"contact_id": "C1", "mode": "phone"}, {"contact_id": "C2", "nested": {"a": [1, 2]}}]
    path = write(tmp_path, "c.json", "\ufeff  \n" + json.dumps(data, indent=2))
    rows = rows_of(path)
    assert [r.values for r in rows] == data
    assert [(r.location.unit, r.location.row) for r in rows] == [("index", 0), ("index", 1)]
    assert str(rows[1].location) == "c.json index 1"


def test_json_empty_array(tmp_path: Path) -> None:
    assert rows_of(write(tmp_path, "c.json", "[ ]")) == []


def test_json_larger_than_a_chunk_with_a_record_across_the_boundary(tmp_path: Path) -> None:
    chunk = json_reader._CHUNK
    records, text = [], "["
    while len(text) < chunk + 50_000:
        record = {"contact_id": f"C{len(records)}", "notes": "ñ" * 997, "duration_minutes": len(records)}
        text += ("," if records else "") + json.dumps(record, ensure_ascii=False)
        records.append(record)
    text += "]"
    # Some record starts before the 1 MiB boundary and ends after it.
    starts = [text.index(f'"C{i}"') for i in range(len(records))]
    assert any(s < chunk < e for s, e in itertools.pairwise(starts))
    path = write(tmp_path, "c.json", text)
    rows = rows_of(path)
    assert [r.values for r in rows] == records
    assert [r.location.row for r in rows] == list(range(len(records)))


def test_json_number_at_the_chunk_edge(tmp_path: Path) -> None:
    # A top-level number straddling the 1 MiB boundary ("12345e" | "-2") must be read as one element,
    # not as 12345 followed by garbage that ends the file.
    chunk = json_reader._CHUNK
    pad = json.dumps({"notes": "x" * (chunk - 40)})
    head = "[" + pad + ","
    text = head + " " * (chunk - len(head) - 6) + "12345e-2, {\"n\": 1}]"
    assert text[chunk - 6 : chunk + 2] == "12345e-2"
    rows = rows_of(write(tmp_path, "c.json", text))
    assert len(rows) == 3
    assert rows[1].error == "expected a JSON object for each record"
    assert rows[2].values == {"n": 1}


@pytest.mark.parametrize("chunk", list(range(1, 41)))
def test_json_every_chunk_edge_gives_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   chunk: int) -> None:
    # With a tiny chunk every token of the document meets a chunk boundary somewhere.
    values = [{"n": 1.5e3, "s": "a,b]"}, 12, -0.25e-2, 1e5, True, None, {"t": "ñ\\\"x"}, [1, 2], {"z": -7}]
    text = json.dumps(values, ensure_ascii=False)
    path = write(tmp_path, "c.json", text)
    monkeypatch.setattr(json_reader, "_CHUNK", chunk)
    rows = rows_of(path)
    assert len(rows) == len(values)
    for row, value in zip(rows, values, strict=True):
        if isinstance(value, dict):
            assert row.values == value and row.error is None
        else:
            assert row.error == "expected a JSON object for each record"


def test_json_path_into_a_nested_document(tmp_path: Path) -> None:
    document = {"meta": {"exported": "2024-03-01"}, "data": {"contacts": [{"contact_id": "C1"}, 5]}}
    path = write(tmp_path, "export.json", json.dumps(document))
    rows = rows_of(path, json_path="data.contacts")
    assert rows[0].values == {"contact_id": "C1"}
    assert rows[1].error == "expected a JSON object for each record"
    assert [r.location.row for r in rows] == [0, 1]
    with pytest.raises(InputError, match=r"json_path 'data\.visits' not found"):
        rows_of(path, json_path="data.visits")
    with pytest.raises(InputError, match="is not an array"):
        rows_of(path, json_path="meta.exported")


def test_json_truncated_gives_an_error_row(tmp_path: Path) -> None:
    path = write(tmp_path, "c.json", '[{"contact_id": "C1"}, {"contact_id": "C2"}, {"contact_id": "C')
    rows = rows_of(path)
    assert [r.values for r in rows[:2]] == [{"contact_id": "C1"}, {"contact_id": "C2"}]
    assert rows[2].error is not None and rows[2].error.startswith("not valid JSON")
    assert rows[2].location.row == 2
    # Cut right after an element: the missing ']' is reported too.
    rows = rows_of(write(tmp_path, "d.json", '[{"contact_id": "C1"}'))
    assert rows[0].values == {"contact_id": "C1"} and rows[1].error is not None


def test_json_truncated_nested_document_is_an_input_error(tmp_path: Path) -> None:
    path = write(tmp_path, "c.json", '{"data": {"contacts": [{"contact_id": "C1"}')
    with pytest.raises(InputError, match="not valid JSON"):
        rows_of(path, json_path="data.contacts")


def test_json_not_an_array(tmp_path: Path) -> None:
    for text in ("", "   ", '{"contacts": []}', "42"):
        with pytest.raises(InputError, match="expected a JSON array"):
            rows_of(write(tmp_path, "c.json", text))


def test_json_non_object_elements(tmp_path: Path) -> None:
    rows = rows_of(write(tmp_path, "c.json", '[1, "two", null, [3], {"ok": true}, false]'))
    assert [r.error is None for r in rows] == [False, False, False, False, True, False]
    assert rows[4].values == {"ok": True}


def test_json_broken_element_stops_the_file_without_reading_it_whole(tmp_path: Path) -> None:
    # A syntax error early in a large file: one error row, and memory does not grow with the file.
    good = json.dumps({"contact_id": "C", "notes": "x" * 500})
    text = '[{"contact_id": "C0"}, {"contact_id": "C1" "mode": "phone"}, ' + ",".join([good] * 40_000) + "]"
    path = write(tmp_path, "c.json", text)
    assert path.stat().st_size > 16 * json_reader._CHUNK
    tracemalloc.start()
    try:
        rows = rows_of(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == 2
    assert rows[1].error is not None and "Expecting ',' delimiter" in rows[1].error
    assert peak < 8 * json_reader._CHUNK  # a couple of 1 MiB chunks, not the 20 MB file


def test_json_deep_nesting_and_huge_integers_are_error_rows(tmp_path: Path) -> None:
    rows = rows_of(write(tmp_path, "c.json", '[{"a": 1}, ' + "[" * 100_000 + "]" * 100_000 + "]"))
    assert rows[0].values == {"a": 1}
    assert rows[1].error is not None
    rows = rows_of(write(tmp_path, "d.json", '[{"a": 1}, {"b": ' + "9" * 5000 + "}]"))
    assert rows[0].values == {"a": 1} and rows[1].error is not None


def test_json_invalid_utf8_in_one_record(tmp_path: Path) -> None:
    path = write(tmp_path, "c.json", b'[{"id": "C1"}, {"id": "C\xff2"}, {"id": "C3"}]')
    rows = rows_of(path)
    assert [r.values for r in rows] == [{"id": "C1"}, {}, {"id": "C3"}]
    assert rows[1].error == "the record has bytes that are not valid UTF-8 text"


def test_json_lone_surrogate_escape_is_rejected(tmp_path: Path) -> None:
    rows = rows_of(write(tmp_path, "c.json", '[{"id": "\\ud800"}]'))
    assert rows[0].error is not None


# -- NDJSON --------------------------------------------------------------------------------------------


def test_ndjson_blank_and_bad_lines(tmp_path: Path) -> None:
    text = '{"id": "C1"}\r\n\n   \n{"id": "C2", "n": [1]}\n{"id": \n[1, 2]\n{"id": "C5"}'
    rows = rows_of(write(tmp_path, "c.ndjson", text))
    assert [(r.location.unit, r.location.row) for r in rows] == [("line", 1), ("line", 4), ("line", 5),
                                                                 ("line", 6), ("line", 7)]
    assert rows[0].values == {"id": "C1"} and rows[1].values == {"id": "C2", "n": [1]}
    assert rows[2].error is not None and rows[2].error.startswith("not valid JSON")
    assert rows[3].error == "expected a JSON object for each record"
    assert rows[4].values == {"id": "C5"}


def test_ndjson_jsonl_suffix_bom_and_bad_bytes(tmp_path: Path) -> None:
    data = codecs.BOM_UTF8 + b'{"id": "C1"}\n{"id": "\xe9"}\n{"id": "C3"}\n'
    rows = rows_of(write(tmp_path, "c.jsonl", data))
    assert rows[0].values == {"id": "C1"} and rows[2].values == {"id": "C3"}
    assert rows[1].error is not None


def test_ndjson_deep_nesting_and_huge_integers_do_not_crash(tmp_path: Path) -> None:
    text = '{"id": "C1"}\n' + "[" * 100_000 + "\n" + '{"n": ' + "1" * 5000 + "}\n" + '{"id": "C4"}\n'
    rows = rows_of(write(tmp_path, "c.ndjson", text))
    assert [r.error is None for r in rows] == [True, False, False, True]
    assert rows[3].values == {"id": "C4"} and rows[3].location.row == 4


# -- Excel ---------------------------------------------------------------------------------------------


@pytest.fixture
def workbook(tmp_path: Path) -> Path:
    wb = Workbook()
    contacts = wb.active
    contacts.title = "Contacts"
    contacts.append([])  # blank rows above the header, as people leave them
    contacts.append([])
    contacts.append([" contact_id ", "contact_datetime", "duration_minutes", "notes"])
    contacts.append([1042, datetime(2024, 7, 1, 10, 30), 30, "  multi\nline  "])
    contacts.append([])
    contacts.append(["C-2", date(2024, 1, 15), 12.5])
    contacts.append([1043.0])
    supporters = wb.create_sheet("Supporters")
    supporters.append(["staff_id", "given_name"])
    supporters.append([7, "Ana"])
    path = tmp_path / "program.xlsx"
    wb.save(path)
    return path


def test_excel_header_detection_types_and_numbering(workbook: Path) -> None:
    rows = rows_of(workbook, sheet="Contacts")
    assert [r.location.row for r in rows] == [4, 5, 6, 7]  # the sheet's own row numbers; header = row 3
    assert rows[0].values == {"contact_id": 1042, "contact_datetime": datetime(2024, 7, 1, 10, 30),
                              "duration_minutes": 30, "notes": "multi\nline"}
    assert rows[1].is_blank()
    assert isinstance(rows[2].values["contact_datetime"], datetime)  # Excel dates come back as datetime
    assert rows[2].values["duration_minutes"] == 12.5
    assert rows[3].values == {"contact_id": 1043, "contact_datetime": None, "duration_minutes": None, "notes": None}
    assert str(rows[0].location) == "program.xlsx[Contacts] row 4"


def test_excel_title_row_above_the_header_becomes_the_header(tmp_path: Path) -> None:
    # Documented pitfall (mappings/README.md, troubleshooting): the first non-empty row is the header.
    wb = Workbook()
    wb.active.title = "Contacts"
    wb.active.append(["Contact log, spring 2024"])
    wb.active.append(["contact_id", "mode"])
    wb.active.append(["C1", "phone"])
    wb.save(tmp_path / "t.xlsx")
    rows = rows_of(tmp_path / "t.xlsx", sheet="Contacts")
    assert list(rows[0].values) == ["Contact log, spring 2024"]


def test_excel_sheets_and_missing_sheet(workbook: Path) -> None:
    assert sheet_names(workbook) == ["Contacts", "Supporters"]
    (row,) = rows_of(workbook, sheet="Supporters")
    assert row.values == {"staff_id": 7, "given_name": "Ana"} and row.location.sheet == "Supporters"
    with pytest.raises(InputError, match="no worksheet named 'Goals'"):
        rows_of(workbook, sheet="Goals")
    with pytest.raises(InputError, match="needs a sheet name"):
        rows_of(workbook)


def test_excel_with_a_wrong_recorded_size_is_read_whole(tmp_path: Path) -> None:
    # Some exporters record a wrong sheet size ("A1:B2"); openpyxl's read-only mode would stop there.
    wb = Workbook()
    wb.active.title = "Contacts"
    wb.active.append(["contact_id", "mode", "notes"])
    for i in range(5):
        wb.active.append([f"C{i}", "phone", f"n{i}"])
    wb.save(tmp_path / "ok.xlsx")
    with zipfile.ZipFile(tmp_path / "ok.xlsx") as src, zipfile.ZipFile(tmp_path / "stale.xlsx", "w") as out:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.startswith("xl/worksheets/"):
                data, n = re.subn(rb'<dimension ref="[^"]*" ?/>', b'<dimension ref="A1:B2"/>', data)
                assert n == 1
            out.writestr(item, data)
    rows = rows_of(tmp_path / "stale.xlsx", sheet="Contacts")
    assert [r.location.row for r in rows] == [2, 3, 4, 5, 6]
    assert rows[-1].values == {"contact_id": "C4", "mode": "phone", "notes": "n4"}


def test_excel_not_a_workbook(tmp_path: Path) -> None:
    for name, data in (("a.xlsx", b"not a zip at all"), ("b.xlsx", b""), ("c.xlsm", b"PK\x03\x04broken")):
        path = write(tmp_path, name, data)
        with pytest.raises(InputError, match="not a readable Excel workbook"):
            rows_of(path, sheet="Contacts")
        with pytest.raises(InputError):
            sheet_names(path)


def test_excel_ids_stored_as_numbers_become_plain_text(tmp_path: Path) -> None:
    # Through the template profile: 1042 / 1042.0 in an id column is the id "1042", not "1042.0".
    from connector.model import RecordKind
    from connector.read.profile import load_profile
    from connector.read.program import read_program
    from connector.read.staging import Staging

    wb = Workbook()
    ws = wb.active
    ws.title = "Supporters"
    ws.append(["staff_id", "given_name", "family_name", "title"])
    ws.append([1042.0, "Ana", "Peña", "CHW"])
    ws.append([1043, "Luz", "Ríos", "promotora"])
    path = tmp_path / "program.xlsx"
    wb.save(path)
    with Staging() as staging:
        report = read_program(load_profile("peersync-template"), [path], staging)
        ids = [r.key for r in staging.records(RecordKind.SUPPORTER)]
    assert ids == ["1042", "1043"]
    assert report.balanced()
    # The workbook has no Enrollments/Contacts/... sheets: each missing sheet is a warning, not an error.
    assert any("no sheet 'Contacts'" in w for w in report.warnings)


# -- dispatch ------------------------------------------------------------------------------------------


def test_unsupported_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unsupported file type"):
        rows_of(write(tmp_path, "c.xml", "<a/>"))
    with pytest.raises(InputError, match="not found"):
        rows_of(tmp_path / "nope.csv")
    assert issubclass(InputError, PeersyncError)
