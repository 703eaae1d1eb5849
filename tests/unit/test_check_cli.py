"""`peersync check`: counts, exit codes, the rejects report (CSV injection, masking) and the worked example."""

from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from connector import assets
from connector.cli import main
from connector.errors import ExitCode
from connector.read.program import REJECT_COLUMNS

# Patient data and identifiers of the messy program below: none may appear in any output.
SENSITIVE = [
    "Guadalupe", "Zamarripa", "Xochitl", "Peña-Quintero",  # names
    "MRN8841207", "MRN8841208", "MRN8841209",  # MRNs
    "confided about the eviction", "her sister's insulin", "phone 555-0199",  # notes
    "SUP-4410-Q", "SUP-4411-R", "ENR-7731-A", "ENR-7732-B", "ENR-7733-C", "ENR-7799-X",  # ids
    "CON-9912-Z", "CON-9913-Y", "CON-9914-W", "CON-9915-V", "CON-9916-U", "CON-9917-T",
    "CON|9918,$\\S", "GOL-5501-M", "1234567",
]


def write_messy_program(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # Supporters: UTF-8 with BOM, CRLF, stray whitespace, a bad NPI (7 digits).
    (folder / "supporters.csv").write_bytes(codecs.BOM_UTF8 + (
        " staff_id , given_name ,family_name,title,npi\r\n"
        "SUP-4410-Q, Guadalupe ,Zamarripa,Promotora de salud,\r\n"
        "SUP-4411-R,Xochitl,Peña-Quintero,CHW,1234567\r\n"
    ).encode())
    # Enrollments: Excel's legacy Windows-1252 export with semicolons; a blank row; an unknown supporter.
    (folder / "enrollments.csv").write_bytes((
        "enrollment_id;mrn;start_date;supporter_id;status\r\n"
        "ENR-7731-A;MRN8841207;45352;SUP-4410-Q;Active\r\n"
        ";;;;\r\n"
        "ENR-7732-B;MRN8841208;03/04/2024;SUP-4410-Q;completed\r\n"
        "ENR-7733-C;MRN8841209;2024-03-05;SUP-4411-R;active\r\n"
    ).encode("cp1252"))
    # Contacts: multi-line notes, formula-looking cells, odd ids, mixed line endings, a duplicate id.
    rows = [
        ["contact_id", "enrollment_id", "supporter_id", "contact_datetime", "duration_minutes", "mode", "outcome",
         "notes", "goal_ids"],
        ["CON-9912-Z", "ENR-7731-A", "SUP-4410-Q", "2024-07-01 10:00", "30", "Tel", "done",
         "She confided about the eviction,\nand \"her sister's insulin\".", ""],
        ["CON-9913-Y", "ENR-7731-A", "SUP-4410-Q", "2024-07-02 10:00", "20", '=HYPERLINK("http://x","y")', "done",
         "", ""],
        ["CON-9914-W", "ENR-7731-A", "SUP-4410-Q", "2024-07-03 10:00", "-5", "phone", "done", "", ""],
        ["CON-9915-V", "ENR-7731-A", "SUP-4410-Q", "+2024-07-04", "10", "phone", "@SUM(1+1)", "phone 555-0199", ""],
        ["CON-9916-U", "ENR-7799-X", "SUP-4410-Q", "2024-07-05 10:00", "10", "phone", "done", "", ""],
        ["CON-9917-T", "ENR-7732-B", "SUP-4410-Q", "2024-07-06 10:00", "10", "phone", "done", "", "GOL-5501-M"],
        ["CON|9918,$\\S", "ENR-7732-B", "SUP-4410-Q", "2024-07-07 10:00", "10", "video", "done", "", ""],
        ["CON-9912-Z", "ENR-7732-B", "SUP-4410-Q", "2024-07-08 10:00", "10", "phone", "done", "", ""],
    ]
    with (folder / "contacts.csv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return folder


def check(*args: str) -> Result:
    return CliRunner().invoke(main, ["check", *args])


def assert_no_sensitive_values(*texts: str) -> None:
    for text in texts:
        for value in SENSITIVE:
            assert value not in text, f"{value!r} leaked"


@pytest.fixture
def messy(tmp_path: Path) -> tuple[Result, Path]:
    rejects = tmp_path / "rejects"
    result = check("--profile", "peersync-template", str(write_messy_program(tmp_path / "in")),
                   "--rejects-dir", str(rejects), "--json")
    return result, rejects


def test_counts_per_kind_and_exit_65(messy: tuple[Result, Path]) -> None:
    result, _ = messy
    assert result.exit_code == ExitCode.RECORDS_REJECTED == 65, result.output
    summary = json.loads(result.stdout)
    assert summary["kinds"] == {
        "contact": {"read": 8, "accepted": 1, "rejected": 7},
        "enrollment": {"read": 3, "accepted": 2, "rejected": 1},
        "supporter": {"read": 2, "accepted": 1, "rejected": 1},
    }
    assert summary["total"] == {"read": 13, "accepted": 4, "rejected": 9}
    assert summary["blank_rows"] == 1
    assert summary["files"] == ["contacts.csv", "enrollments.csv", "supporters.csv"]


def test_rejects_report_rows(messy: tuple[Result, Path]) -> None:
    result, rejects = messy
    summary = json.loads(result.stdout)
    assert summary["rejects_report"] == {"csv": str(rejects / "rejects.csv"), "json": str(rejects / "rejects.json"),
                                         "problems": 10}
    report = json.loads((rejects / "rejects.json").read_text(encoding="utf-8"))
    assert all(list(entry) == REJECT_COLUMNS for entry in report)
    found = {(e["file"], e["row"], e["line"], e["field"]) for e in report}
    # Row 2's notes span two lines, so from row 3 on a contact's row and the editor's line differ by one.
    assert found == {
        ("supporters.csv", "row 3", 3, "npi"),  # bad NPI: the supporter row is rejected...
        ("enrollments.csv", "row 5", 5, "supporter_id"),  # ...so is the enrollment that names them...
        ("contacts.csv", "row 3 (line 4)", 4, "mode"),
        ("contacts.csv", "row 4 (line 5)", 5, "duration_minutes"),
        ("contacts.csv", "row 5 (line 6)", 6, "occurred_at"),  # two problems in one row: both reported
        ("contacts.csv", "row 5 (line 6)", 6, "outcome"),
        ("contacts.csv", "row 6 (line 7)", 7, "enrollment_id"),
        ("contacts.csv", "row 7 (line 8)", 8, "goal_ids"),
        ("contacts.csv", "row 2", 2, "contact_id"),  # duplicate: both rows
        ("contacts.csv", "row 9 (line 10)", 10, "contact_id"),
    }
    by_field = {e["field"]: e for e in report}
    assert by_field["npi"]["value"] == "<masked: 7 characters>"
    assert by_field["mode"]["value"] == '=HYPERLINK("http://x","y")'  # raw in JSON, neutralised in CSV
    assert by_field["duration_minutes"]["reason"] == "Input should be greater than or equal to 0"
    assert by_field["outcome"]["reason"].startswith("unknown code '@SUM(1+1)'")


def test_rejects_csv_neutralises_formulas(messy: tuple[Result, Path]) -> None:
    _, rejects = messy
    with (rejects / "rejects.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == REJECT_COLUMNS
    values = {row[5]: row[6] for row in rows[1:]}
    lines = {row[5]: row[3] for row in rows[1:]}
    assert lines["mode"] == "4" and values["mode"]  # the editor's line, as a number
    assert values["mode"] == "'=HYPERLINK(\"http://x\",\"y\")"
    assert values["outcome"] == "'@SUM(1+1)"
    assert values["occurred_at"] == "'+2024-07-04"
    assert values["duration_minutes"] == "'-5"
    for row in rows[1:]:
        for cell in row:
            assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r"), row


def test_no_sensitive_value_anywhere(messy: tuple[Result, Path], tmp_path: Path) -> None:
    result, rejects = messy
    assert_no_sensitive_values(result.stdout, result.stderr, (rejects / "rejects.csv").read_text(encoding="utf-8"),
                               (rejects / "rejects.json").read_text(encoding="utf-8"))
    # The human-readable output (table + first report lines + warnings) too.
    text = check("--profile", "peersync-template", str(tmp_path / "in"), "--rejects-dir", str(tmp_path / "r2"))
    assert text.exit_code == 65
    assert "rejected rows: 9 (10 problems)" in text.stdout
    assert "contacts.csv,,row 3 (line 4),4,contact,mode," in text.stdout  # rows named as in the report
    assert_no_sensitive_values(text.stdout, text.stderr)


def test_clean_program_exits_0(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "supporters.csv").write_text("staff_id,given_name,family_name,title\nS1,Ana,Peña,promotora\n")
    (folder / "enrollments.csv").write_text("enrollment_id,mrn,start_date,supporter_id\nE1,M1,2024-01-01,S1\n")
    (folder / "notes.txt").write_text("not a program file\n")
    result = check("--profile", "peersync-template", str(folder), "--rejects-dir", str(tmp_path / "r"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["total"] == {"read": 2, "accepted": 2, "rejected": 0}
    assert "notes.txt: no record kind of profile 'peersync-template' reads this file; skipped" in summary["warnings"]
    missing_column = "enrollments.csv: column 'end_date' (for enrollment.end_date) is missing from the file"
    assert missing_column in summary["warnings"]
    assert json.loads((tmp_path / "r" / "rejects.json").read_text()) == []
    assert (tmp_path / "r" / "rejects.csv").read_text().splitlines() == [",".join(REJECT_COLUMNS)]


def test_whole_file_problems_exit_78(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "program.xlsx").write_bytes(b"this is not a workbook")
    result = check("--profile", "peersync-template", str(folder), "--rejects-dir", str(tmp_path / "r"))
    assert result.exit_code == ExitCode.CONFIG_ERROR == 78
    assert "error: program.xlsx: not a readable Excel workbook (BadZipFile)" in result.stderr
    result = check("--profile", str(tmp_path / "nowhere"), str(folder))
    assert result.exit_code == 78 and "profile not found" in result.stderr


# -- the worked example of mappings/README.md ----------------------------------------------------

EXAMPLE = assets.mappings_dir() / "examples" / "sheets-es"


def test_worked_example_profile_check() -> None:
    result = CliRunner().invoke(main, ["profile", "check", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"{EXAMPLE / 'profile.yaml'}: ok (profile 'sheets-es', program "
                             "'la-esperanza-promotoras', kinds: supporter, enrollment, contact)\n")


def test_worked_example_check(tmp_path: Path) -> None:
    result = check("--profile", str(EXAMPLE), str(EXAMPLE / "sample"), "--rejects-dir", str(tmp_path), "--json")
    assert result.exit_code == 65, result.output
    summary: dict[str, Any] = json.loads(result.stdout)
    assert summary["kinds"] == {
        "contact": {"read": 9, "accepted": 6, "rejected": 3},
        "enrollment": {"read": 4, "accepted": 3, "rejected": 1},
        "supporter": {"read": 3, "accepted": 3, "rejected": 0},
    }
    assert summary["blank_rows"] == 1 and summary["warnings"] == []
    with (tmp_path / "rejects.csv").open(encoding="utf-8", newline="") as handle:
        assert list(csv.reader(handle)) == [
            REJECT_COLUMNS,
            ["Registro Promotoras - Contactos.csv", "", "row 6", "6", "contact", "occurred_at", "31/2/2024 11:00",
             "not a date in an expected format (%d/%m/%Y %H:%M)"],
            ["Registro Promotoras - Contactos.csv", "", "row 10", "10", "contact", "enrollment_id",
             "<masked: identifier>",
             "refers to an enrollment that is not in the input or was rejected"],
            ["Registro Promotoras - Contactos.csv", "", "row 11", "11", "contact", "enrollment_id",
             "<masked: identifier>",
             "refers to an enrollment that is not in the input or was rejected"],
            ["Registro Promotoras - Participantes.csv", "", "row 5", "5", "enrollment", "mrn", "",
             "required value is missing"],
        ]
    # The README shows the human-readable table: keep it true.
    text = check("--profile", str(EXAMPLE), str(EXAMPLE / "sample"), "--rejects-dir", str(tmp_path / "t"))
    readme = (assets.mappings_dir() / "README.md").read_text(encoding="utf-8")
    for line in text.stdout.splitlines()[:6]:
        assert line in readme, line


def test_worked_example_records(tmp_path: Path) -> None:
    from connector.model import RecordKind
    from connector.read.profile import load_profile
    from connector.read.program import read_program
    from connector.read.staging import Staging

    with Staging() as staging:
        read_program(load_profile(EXAMPLE), [EXAMPLE / "sample"], staging)
        contacts = {c.key: c for c in staging.records(RecordKind.CONTACT)}
        supporters = {s.key: s for s in staging.records(RecordKind.SUPPORTER)}
        enrollments = {e.key: e for e in staging.records(RecordKind.ENROLLMENT)}
    first = contacts["LE-101-1"]
    assert first.occurred_at.isoformat() == "2024-01-10T10:30:00-08:00"
    assert (first.mode, first.setting, first.outcome) == ("face-to-face", "community-site", "completed")
    assert first.support_types == ("emotional", "education")
    assert first.essential_elements == ("ongoing-follow-up-support", "education-skills-training")
    assert contacts["LE-101-3"].occurred_at.isoformat() == "2024-07-07T09:15:00-07:00"  # summer time
    assert contacts["LE-101-3"].mode == "text-message" and contacts["LE-101-3"].outcome == "not-reached"
    assert contacts["LE-103-1"].setting == "other" and contacts["LE-103-1"].original_text == {"setting": "Parque"}
    assert contacts["LE-103-2"].void is True
    assert supporters["PR-03"].title == "other" and supporters["PR-03"].title_text == "Coordinadora"
    assert supporters["PR-03"].active is False
    assert enrollments["LE-103"].status == "withdrawn" and str(enrollments["LE-103"].end_date) == "2024-04-30"
