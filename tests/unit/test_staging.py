"""Staging: whole-input checks (duplicate ids, dangling references and their cascade) and the counts."""

from __future__ import annotations

import csv
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connector.model import Contact, Enrollment, RecordKind, Supporter
from connector.read.formats.base import RowLocation
from connector.read.profile import Profile, load_profile
from connector.read.program import ReadReport, read_program
from connector.read.staging import Staging

HEADERS = {
    "supporters.csv": ["staff_id", "given_name", "family_name", "title"],
    "enrollments.csv": ["enrollment_id", "mrn", "start_date", "supporter_id"],
    "goals.csv": ["goal_id", "enrollment_id", "goal_in_own_words", "behavior", "start_date", "supporter_id"],
    "goal_notes.csv": ["note_id", "goal_id", "date", "note"],
    "contacts.csv": ["contact_id", "enrollment_id", "supporter_id", "contact_datetime", "mode", "goal_ids",
                     "planned_contact_id"],
    "referrals.csv": ["referral_id", "enrollment_id", "resource_name", "need", "referral_date"],
    "planned_contacts.csv": ["planned_contact_id", "enrollment_id", "due_datetime", "mode", "supporter_id"],
}


def write_program(folder: Path, rows: dict[str, list[list[str]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, header in HEADERS.items():
        with (folder / name).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows.get(name, []))
    return folder


def base_rows() -> dict[str, list[list[str]]]:
    """Two participants (E1 with S1, E2 with S2), each with a goal, a note, a planned contact, a contact, a referral."""
    return {
        "supporters.csv": [["S1", "Ana", "Peña", "promotora"], ["S2", "Luz", "Ríos", "CHW"]],
        "enrollments.csv": [["E1", "M1", "2024-01-02", "S1"], ["E2", "M2", "2024-01-03", "S2"]],
        "goals.csv": [["G1", "E1", "walk daily", "being-active", "2024-01-05", "S1"],
                      ["G2", "E2", "eat more vegetables", "healthy-eating", "2024-01-05", "S2"]],
        "goal_notes.csv": [["N1", "G1", "2024-02-01", "walked 3 times"], ["N2", "G2", "2024-02-01", "salads"]],
        "contacts.csv": [["C1", "E1", "S1", "2024-02-01 10:00", "phone", "G1", "P1"],
                         ["C2", "E2", "S2", "2024-02-01 11:00", "phone", "G2", "P2"]],
        "referrals.csv": [["R1", "E1", "Food bank", "food", "2024-02-01"],
                          ["R2", "E2", "YMCA", "physical-activity", "2024-02-01"]],
        "planned_contacts.csv": [["P1", "E1", "2024-02-01 10:00", "phone", "S1"],
                                 ["P2", "E2", "2024-02-01 11:00", "phone", "S2"]],
    }


@pytest.fixture(scope="module")
def template() -> Profile:
    return load_profile("peersync-template")


def run(template: Profile, folder: Path) -> tuple[ReadReport, dict[str, set[str]], list[tuple[str, int, str, str]]]:
    """Read a folder; return the report, accepted keys per kind, and (file, row, field, reason) of each reject."""
    with Staging() as staging:
        report = read_program(template, [folder], staging)
        accepted = {k.value: {r.key for r in staging.records(k)} for k in RecordKind}
        rejects = [(r.file, r.row, r.field, r.reason) for r in staging.rejects()]
    assert report.balanced(), report.as_dict()
    return report, accepted, rejects


def test_clean_program_is_all_accepted(template: Profile, tmp_path: Path) -> None:
    report, accepted, rejects = run(template, write_program(tmp_path, base_rows()))
    assert rejects == []
    assert all(len(keys) == 2 for keys in accepted.values())
    assert report.total_read == 14 and report.total_rejected == 0


def test_all_rows_of_a_duplicated_id_are_rejected(template: Profile, tmp_path: Path) -> None:
    rows = base_rows()
    rows["referrals.csv"] += [["R1", "E1", "Food bank (again)", "food", "2024-02-02"],
                              ["R1", "E2", "Someone else", "food", "2024-02-03"]]
    report, accepted, rejects = run(template, write_program(tmp_path, rows))
    assert accepted["referral"] == {"R2"}  # none of the three R1 rows is sent: which one is right is unknown
    assert [(f, r, fld) for f, r, fld, _ in rejects] == [("referrals.csv", 2, "referral_id"),
                                                         ("referrals.csv", 4, "referral_id"),
                                                         ("referrals.csv", 5, "referral_id")]
    assert all(reason.startswith("duplicate referral id: 3 rows share it") for *_, reason in rejects)
    assert report.as_dict()["kinds"]["referral"] == {"read": 4, "accepted": 1, "rejected": 3}


def test_duplicates_are_per_kind(template: Profile, tmp_path: Path) -> None:
    rows = base_rows()
    rows["referrals.csv"][0][0] = "X1"  # the same id as a contact and a referral is fine
    rows["contacts.csv"][0][0] = "X1"
    _, accepted, rejects = run(template, write_program(tmp_path, rows))
    assert rejects == [] and "X1" in accepted["referral"] and "X1" in accepted["contact"]


def test_ten_thousand_duplicates_of_one_id_stay_fast() -> None:
    location = RowLocation("contacts.csv", 0)
    contact = Contact(contact_id="C1", enrollment_id="E1", supporter_id="S1",
                      occurred_at=datetime(2024, 1, 1, tzinfo=UTC), mode="telephone")
    with Staging() as staging:
        staging.add(Supporter(staff_id="S1", given_name="A", family_name="B", title="other"), location)
        staging.add(Enrollment(enrollment_id="E1", mrn="M", start_date="2024-01-01", supporter_id="S1"), location)
        started = time.perf_counter()
        for row in range(2, 10_002):
            staging.add(contact, RowLocation("contacts.csv", row))
        staging.finalize()
        elapsed = time.perf_counter() - started
        assert staging.counts() == {"supporter": 1, "enrollment": 1}
        assert staging.rejected_rows() == {"contact": 10_000}
        reasons = {r.reason for r in staging.rejects()}
    assert reasons == {"duplicate contact id: 10000 rows share it; none is sent until the source is fixed"}
    assert elapsed < 5, f"finalize took {elapsed:.1f} s for 10,000 duplicates"


def test_rejected_enrollment_cascades_to_everything_of_that_participant(template: Profile, tmp_path: Path) -> None:
    rows = base_rows()
    rows["enrollments.csv"][0][3] = "S9"  # E1 names a supporter who does not exist
    report, accepted, rejects = run(template, write_program(tmp_path, rows))
    assert accepted == {"supporter": {"S1", "S2"}, "enrollment": {"E2"}, "goal": {"G2"}, "goal_note": {"N2"},
                        "contact": {"C2"}, "referral": {"R2"}, "planned_contact": {"P2"}}
    by_file = {f: (fld, reason) for f, _, fld, reason in rejects}
    assert by_file["enrollments.csv"] == ("supporter_id",
                                          "refers to a supporter that is not in the input or was rejected")
    assert by_file["goals.csv"][0] == "enrollment_id"
    assert by_file["goal_notes.csv"][0] == "goal_id"  # through the goal
    assert by_file["referrals.csv"][0] == "enrollment_id"
    assert by_file["planned_contacts.csv"][0] == "enrollment_id"
    assert by_file["contacts.csv"][0] == "enrollment_id"
    assert len(rejects) == 6  # one problem per row: the first reference that fails
    assert report.total_rejected == 6


def test_rejected_enrollment_in_ingest_cascades_too(template: Profile, tmp_path: Path) -> None:
    rows = base_rows()
    rows["enrollments.csv"][0][1] = ""  # E1 has no MRN: rejected while reading, never staged
    _, accepted, rejects = run(template, write_program(tmp_path, rows))
    assert accepted["enrollment"] == {"E2"} and accepted["contact"] == {"C2"} and accepted["goal_note"] == {"N2"}
    assert ("enrollments.csv", 2, "mrn", "required value is missing") in rejects


def test_rejected_goal_takes_its_notes_and_the_contacts_linking_it(template: Profile, tmp_path: Path) -> None:
    rows = base_rows()
    rows["goals.csv"][1][3] = "juggling"  # G2: unknown behaviour -> rejected
    rows["contacts.csv"].append(["C3", "E2", "S2", "2024-02-02 11:00", "phone", "", ""])  # links no goal
    _, accepted, rejects = run(template, write_program(tmp_path, rows))
    assert accepted["goal"] == {"G1"} and accepted["goal_note"] == {"N1"}
    assert accepted["contact"] == {"C1", "C3"}
    assert accepted["enrollment"] == {"E1", "E2"} and accepted["planned_contact"] == {"P1", "P2"}
    fields = {(f, fld) for f, _, fld, _ in rejects}
    assert fields == {("goals.csv", "behavior"), ("goal_notes.csv", "goal_id"), ("contacts.csv", "goal_ids")}


def test_contact_linking_another_participants_goal_is_rejected(template: Profile, tmp_path: Path) -> None:
    rows = base_rows()
    rows["contacts.csv"][0][5] = "G1;G2"  # C1 is E1's contact; G2 is E2's goal
    _, accepted, rejects = run(template, write_program(tmp_path, rows))
    assert accepted["contact"] == {"C2"}
    assert rejects == [("contacts.csv", 2, "goal_ids",
                        "refers to a goal that is not this participant's, is not in the input, or was rejected")]


def test_rejected_planned_contact_takes_the_contact_that_fulfils_it(template: Profile, tmp_path: Path) -> None:
    rows = base_rows()
    rows["planned_contacts.csv"][0][2] = "someday"
    _, accepted, rejects = run(template, write_program(tmp_path, rows))
    assert accepted["planned_contact"] == {"P2"} and accepted["contact"] == {"C2"}
    assert {(f, fld) for f, _, fld, _ in rejects} == {("planned_contacts.csv", "due_at"),
                                                      ("contacts.csv", "planned_contact_id")}


def test_rejected_supporter_cascades_through_enrollments(template: Profile, tmp_path: Path) -> None:
    rows = base_rows()
    rows["supporters.csv"].append(["S2", "Luz", "Ríos", "CHW"])  # S2 duplicated: both rows rejected
    report, accepted, _ = run(template, write_program(tmp_path, rows))
    assert accepted["supporter"] == {"S1"}
    assert accepted["enrollment"] == {"E1"} and accepted["contact"] == {"C1"} and accepted["goal_note"] == {"N1"}
    assert report.as_dict()["kinds"]["supporter"] == {"read": 3, "accepted": 1, "rejected": 2}


def test_read_equals_accepted_plus_rejected_per_kind(template: Profile, tmp_path: Path) -> None:
    rows = base_rows()
    rows["contacts.csv"] += [["C9", "E1", "S1", "not a date", "pigeon", "", ""],  # two problems, one row
                             ["", "", "", "", "", "", ""],  # blank: counted apart
                             ["C2", "E2", "S2", "2024-02-05 11:00", "phone", "", ""]]  # duplicate of C2
    rows["goals.csv"].append(["G3", "E404", "x", "coping", "2024-01-05", ""])
    report, _, rejects = run(template, write_program(tmp_path, rows))
    kinds = report.as_dict()["kinds"]
    assert kinds["contact"] == {"read": 4, "accepted": 1, "rejected": 3}
    assert kinds["goal"] == {"read": 3, "accepted": 2, "rejected": 1}
    assert report.blank_rows == 1
    assert len([r for r in rejects if r[0] == "contacts.csv" and r[1] == 4]) == 2  # problems, not rows
    for kind, counts in kinds.items():
        assert counts["read"] == counts["accepted"] + counts["rejected"], kind


def test_reject_values_of_references_are_masked(template: Profile, tmp_path: Path) -> None:
    rows = base_rows()
    rows["contacts.csv"][0][1] = "E-SECRET-404"
    with Staging() as staging:
        read_program(template, [write_program(tmp_path, rows)], staging)
        values = [r.value for r in staging.rejects()]
    assert values == ["<masked: identifier>"]


def test_same_file_given_twice_is_read_once(template: Profile, tmp_path: Path) -> None:
    folder = write_program(tmp_path, base_rows())
    with Staging() as staging:
        report = read_program(template, [folder, folder / "contacts.csv", folder / ".." / folder.name], staging)
    assert report.balanced() and report.total_rejected == 0
    assert report.as_dict()["kinds"]["contact"] == {"read": 2, "accepted": 2, "rejected": 0}


def test_same_named_files_in_two_folders_stay_apart(template: Profile, tmp_path: Path) -> None:
    # Monthly exports in folders of their own: a/contacts.csv and b/contacts.csv both have a "row 2".
    write_program(tmp_path / "a", {**base_rows(), "contacts.csv": [["C1", "E1", "S1", "bad", "phone", "", ""]]})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "contacts.csv").write_text("contact_id,enrollment_id,supporter_id,contact_datetime,mode\n"
                                                 "C2,E2,S2,also bad,phone\n")
    with Staging() as staging:
        report = read_program(template, [tmp_path / "a", tmp_path / "b"], staging)
        files = [r.file for r in staging.rejects()]
    assert report.balanced()
    assert report.as_dict()["kinds"]["contact"] == {"read": 2, "accepted": 0, "rejected": 2}
    assert files == [str(tmp_path / "a" / "contacts.csv"), str(tmp_path / "b" / "contacts.csv")]


def test_staged_records_round_trip(template: Profile, tmp_path: Path) -> None:
    with Staging(tmp_path / "staging.sqlite") as staging:
        read_program(template, [write_program(tmp_path / "in", base_rows())], staging)
        contacts = list(staging.records(RecordKind.CONTACT))
        assert [c.key for c in contacts] == ["C1", "C2"]
        assert [c.key for c in staging.records(RecordKind.CONTACT, participant="E2")] == ["C2"]
        assert [n.key for n in staging.records(RecordKind.GOAL_NOTE, participant="E1")] == ["N1"]
        assert staging.participants() == ["E1", "E2"]
    assert contacts[0].occurred_at.isoformat() == "2024-02-01T10:00:00-06:00"
