"""Header matching (case, spaces, BOMs) and the shape guard: a renamed, dropped or cut column or sheet never
erases data on the server; the held kind is named in the summary; --accept-shape-change confirms it."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from openpyxl import Workbook

from connector.errors import InputError
from connector.map import MappingContext
from connector.plan.ledger import Ledger, UnitState
from connector.plan.planner import Act, units_to_write
from connector.plan.shape import KindShape, held_unit_kinds, shape_changes
from connector.read.columns import HeaderMatcher, normalise_header
from connector.read.profile import load_profile
from connector.read.program import read_program
from connector.read.staging import Staging
from connector.run import Syncer, SyncOptions, exit_for, read_and_plan

PROFILE = load_profile("peersync-template")
SUPPORTERS = [["staff_id", "given_name", "family_name", "title"], ["S1", "Ana", "Lopez", "promotora"]]
ENROLLMENTS = [["enrollment_id", "mrn", "start_date", "status", "supporter_id"],
               ["E1", "MRN1", "2026-01-05", "active", "S1"], ["E2", "MRN2", "2026-01-06", "active", "S1"]]
HEADER = ["contact_id", "enrollment_id", "supporter_id", "contact_datetime", "mode", "support_types", "notes"]


def contacts(n: int, header: list[str] = HEADER) -> list[list[str]]:
    rows = [header]
    for i in range(1, n + 1):
        row = dict(zip(HEADER, [f"C{i}", "E1" if i % 2 else "E2", "S1", f"2026-02-{i % 28 + 1:02d} 10:00",
                                "telephone", "emotional", f"talked {i}"], strict=True))
        rows.append([row.get(h.strip().lstrip("\ufeff").lower(), "") for h in header])
    return rows


def write_inputs(folder: Path, contact_rows: list[list[str]], encoding: str = "utf-8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("supporters.csv", SUPPORTERS), ("enrollments.csv", ENROLLMENTS),
                       ("contacts.csv", contact_rows)):
        with (folder / name).open("w", newline="", encoding=encoding if name == "contacts.csv" else "utf-8") as f:
            csv.writer(f).writerows(rows)
    return folder


# -- header matching ------------------------------------------------------------------------------------


def test_headers_match_ignoring_case_spaces_and_boms() -> None:
    assert normalise_header("\ufeff Notes \t") == "notes"
    matcher = HeaderMatcher({"notes", "contact_id"})
    assert matcher.renames(["CONTACT_ID", "Notes ", "other"], "f.csv") == {"CONTACT_ID": "contact_id",
                                                                           "Notes ": "notes"}
    assert matcher.renames(["contact_id", "notes"], "f.csv") == {}


def test_two_headers_for_one_column_are_refused_naming_the_file() -> None:
    with pytest.raises(InputError, match=r"contacts\.csv: columns 'notes' and 'Notes' both match"):
        HeaderMatcher({"notes"}).renames(["notes", "Notes"], "contacts.csv")


def test_a_profile_that_spells_two_columns_alike_is_refused() -> None:
    with pytest.raises(InputError, match="the profile must spell them apart"):
        HeaderMatcher({"Notes", "notes"}).renames(["NOTES"], "contacts.csv")


def test_renamed_csv_column_is_read(tmp_path: Path) -> None:
    header = ["Contact_ID", "enrollment_id", " SUPPORTER_ID", "contact_datetime", "mode", "support_types", "Notes "]
    folder = write_inputs(tmp_path / "in", contacts(2, header), encoding="utf-8-sig")
    with Staging() as staging:
        report = read_program(PROFILE, [folder], staging)
        notes = [c.notes for c in staging.records(next(k for k in PROFILE.records if k.value == "contact"))]
    assert report.accepted["contact"] == 2 and notes == ["talked 1", "talked 2"]
    assert not [w for w in report.warnings if any(f"'{c}'" in w for c in ("notes", "contact_id", "supporter_id"))]
    assert {"notes", "contact_id", "supporter_id"} <= report.present_columns["contact"]


def test_renamed_excel_column_is_read(tmp_path: Path) -> None:
    book = Workbook()
    sheet = book.active
    sheet.title = "Contacts"
    for row in contacts(3, [h.upper() for h in HEADER]):
        sheet.append(row)
    book.save(tmp_path / "program.xlsx")
    with Staging() as staging:
        report = read_program(PROFILE, [tmp_path / "program.xlsx"], staging)
    assert report.read["contact"] == 3 and "notes" in report.present_columns["contact"]


# -- the decision ---------------------------------------------------------------------------------------


def shape(columns: set[str], rows: int) -> KindShape:
    return KindShape(frozenset(columns), rows)


def test_missing_column_and_row_drop_hold_the_kind() -> None:
    before = {"contact": shape({"contact_id", "notes"}, 100), "goal": shape({"goal_id"}, 10)}
    now = {"contact": shape({"contact_id"}, 100), "goal": shape({"goal_id"}, 5)}
    mapped = {"contact": {"contact_id", "notes"}, "goal": {"goal_id"}}
    changes = shape_changes(before, now, mapped, max_row_drop_fraction=0.2)
    assert "column 'notes' is missing" in changes["contact"]
    assert "5 rows read, 10 at the last completed run" in changes["goal"]
    assert "--accept-shape-change" in changes["goal"]


def test_small_drops_new_columns_and_unmapped_columns_pass() -> None:
    before = {"contact": shape({"contact_id", "notes", "old"}, 100)}
    now = {"contact": shape({"contact_id", "notes", "new"}, 81)}
    mapped = {"contact": {"contact_id", "notes", "new"}}  # the profile stopped reading "old" on purpose
    assert shape_changes(before, now, mapped, max_row_drop_fraction=0.2) == {}
    assert shape_changes({"referral": shape({"x"}, 3)}, {}, mapped, max_row_drop_fraction=0.2) == {}


def test_a_kind_gone_from_the_input_is_held() -> None:
    changes = shape_changes({"goal": shape({"goal_id"}, 4)}, {}, {"goal": {"goal_id"}}, max_row_drop_fraction=0.2)
    assert "goal held" in changes["goal"] and "0 rows read" in changes["goal"]


def test_held_kinds_take_what_is_built_from_them() -> None:
    # "note": the clinical notes (clinical-note mode) render contacts, goals, referrals...
    assert held_unit_kinds(["goal_note"]) == {"goal_note", "goal", "note"}
    assert held_unit_kinds(["referral"]) == {"referral", "enrollment", "cbo", "note"}
    assert held_unit_kinds(["contact"]) == {"contact", "enrollment", "note"}  # the CareTeam lists its supporters


def test_exit_code_of_a_held_run_is_65() -> None:
    assert exit_for(Counter(), shape_held=True) == (65, "partial")
    assert exit_for(Counter({"pending": 1}), shape_held=True)[0] == 69


# -- a run ------------------------------------------------------------------------------------------------


class NoServer:
    """A client the held run must never use: any write would fail the test."""

    stats = SimpleNamespace(requests=0, writes=0, retries=0)
    deadline = SimpleNamespace(start=lambda _seconds: None)  # the run's clock starts; that sends nothing

    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"the held run talked to the server ({name})")


def options(tmp_path: Path, folder: Path, **kw: object) -> SyncOptions:
    ctx = MappingContext.from_profile(PROFILE, program_id="demo")
    return SyncOptions(profile=PROFILE, inputs=[folder], ledger_path=tmp_path / "ledger.sqlite", ctx=ctx,
                       rejects_dir=tmp_path / "rejects", **kw)  # type: ignore[arg-type]


def first_sync(tmp_path: Path, folder: Path) -> None:
    """Plan the inputs and pretend the server confirmed everything; remember the shape, as a completed run does."""
    opts = options(tmp_path, folder)
    with Ledger(opts.ledger_path) as ledger, Staging(tmp_path / "first.sqlite") as staging:
        _report, plan, _ = read_and_plan(opts, ledger, staging)
        for participant in [None, "E1", "E2"]:
            for unit_key, kind, _sid, unit_hash, _action in units_to_write(staging, participant):
                ledger.record_confirmed(unit_key, kind=kind, participant=participant, unit_hash=unit_hash or "",
                                        voided=False, patient_id="p", resources=[], detail="200", run_id="r0")
        ledger.record_shapes({k: (sorted(s.columns), s.rows) for k, s in plan.shapes_seen.items()}, run_id="r0")


def test_a_dropped_notes_column_holds_contacts_and_says_why(tmp_path: Path) -> None:
    first_sync(tmp_path, write_inputs(tmp_path / "in", contacts(6)))
    dropped = [row[:-1] for row in contacts(6)]  # the export lost its notes column
    write_inputs(tmp_path / "in", dropped)
    summary = Syncer(options(tmp_path, tmp_path / "in"), NoServer()).run("r1")  # type: ignore[arg-type]
    assert (summary.exit_code, summary.outcome) == (65, "partial")
    assert summary.counts["held"] == 6 and summary.counts["updated"] == 0
    assert len(summary.shape_held) == 1 and "column 'notes' is missing" in summary.shape_held[0]
    assert any("column 'notes'" in w for w in summary.warnings)  # what `check` warns about reaches sync
    assert summary.as_dict()["shape_held"] == summary.shape_held
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert "notes" in ledger.shapes()["contact"][0]  # the old shape is kept until accepted
        assert ledger.state_counts() == {UnitState.SENT: 10}  # nothing written


def test_accepting_the_change_writes_it_and_remembers_the_new_shape(tmp_path: Path) -> None:
    first_sync(tmp_path, write_inputs(tmp_path / "in", contacts(6)))
    write_inputs(tmp_path / "in", [row[:-1] for row in contacts(6)])
    opts = options(tmp_path, tmp_path / "in", accept_shape_change=True)
    with Ledger(opts.ledger_path) as ledger, Staging(tmp_path / "s.sqlite") as staging:
        _report, plan, _ = read_and_plan(opts, ledger, staging)
    assert plan.shape_held == [] and plan.by_kind["contact"][Act.UPDATE] == 6
    assert "notes" not in plan.shapes_seen["contact"].columns


def test_half_the_rows_hold_updates_and_deletions_but_not_creates(tmp_path: Path) -> None:
    first_sync(tmp_path, write_inputs(tmp_path / "in", contacts(10)))
    rows = contacts(10)[:6]  # C1..C5 kept
    rows[1][-1] = "edited"
    rows.append(["C99", "E1", "S1", "2026-03-01 10:00", "telephone", "emotional", "new"])
    write_inputs(tmp_path / "in", rows)
    opts = options(tmp_path, tmp_path / "in")
    with Ledger(opts.ledger_path) as ledger, Staging(tmp_path / "s.sqlite") as staging:
        _report, plan, _ = read_and_plan(opts, ledger, staging)
    c = plan.by_kind["contact"]
    assert (c[Act.UPDATE], c[Act.DELETE], c[Act.CREATE], c[Act.HELD]) == (0, 0, 1, 1)
    assert "6 rows read, 10 at the last completed run" in plan.shape_held[0]
