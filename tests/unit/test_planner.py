"""The planner: unchanged units cost nothing; edits, voids, deletions and retries are planned exactly."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from connector.plan.ledger import Ledger, UnitState
from connector.plan.planner import Act, _sha, compute_plan, units_to_write
from connector.read.profile import load_profile
from connector.read.program import read_program
from connector.read.staging import Staging

PROFILE = load_profile("peersync-template")

SUPPORTERS = [["staff_id", "given_name", "family_name", "title"], ["S1", "Ana", "Lopez", "promotora"]]
ENROLLMENTS = [["enrollment_id", "mrn", "start_date", "status", "supporter_id"],
               ["E1", "MRN1", "2026-01-05", "active", "S1"], ["E2", "MRN2", "2026-01-06", "active", "S1"]]
HEADER = ["contact_id", "enrollment_id", "supporter_id", "contact_datetime", "mode", "support_types", "notes", "void"]


def contacts(n: int, *, edited: set[int] = frozenset(), voided: set[int] = frozenset()) -> list[list[str]]:
    rows = [HEADER]
    for i in range(1, n + 1):
        note = "edited" if i in edited else "talked"
        rows.append([f"C{i}", "E1" if i % 2 else "E2", "S1", f"2026-02-{i % 28 + 1:02d} 10:00", "telephone",
                     "emotional", note, "1" if i in voided else ""])
    return rows


def write(folder: Path, name: str, rows: list[list[str]]) -> None:
    with (folder / name).open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)


def plan_for(tmp: Path, ledger: Ledger, contact_rows: list[list[str]], fingerprint: str = "fp1"):
    folder = tmp / "in"
    folder.mkdir(exist_ok=True)
    write(folder, "supporters.csv", SUPPORTERS)
    write(folder, "enrollments.csv", ENROLLMENTS)
    write(folder, "contacts.csv", contact_rows)
    staging = Staging(tmp / "staging.sqlite")
    staging.db.execute("DELETE FROM staged")
    staging.db.execute("DELETE FROM rejects")
    read_program(PROFILE, [folder], staging)
    return staging, compute_plan(staging, ledger, program_id="demo", fingerprint=fingerprint)


def confirm_all(staging: Staging, ledger: Ledger) -> None:
    """Pretend the server confirmed every planned write."""
    for participant in [None, "E1", "E2"]:
        for unit in units_to_write(staging, participant):
            ledger.record_confirmed(unit.unit_key, kind=unit.kind, participant=participant,
                                    unit_hash=unit.unit_hash or "", voided=unit.action is Act.VOID, patient_id="p",
                                    resources=[], detail="200", run_id="r")


@pytest.fixture()
def ledger(tmp_path: Path) -> Ledger:
    with Ledger(tmp_path / "ledger.sqlite") as led:
        yield led


def test_first_plan_creates_everything_then_nothing(tmp_path: Path, ledger: Ledger) -> None:
    staging, plan = plan_for(tmp_path, ledger, contacts(10))
    assert plan.total(Act.CREATE) == 1 + 1 + 2 + 10  # program, supporter, 2 enrollments, 10 contacts
    assert plan.by_resource_type["Communication"][Act.CREATE] == 10
    confirm_all(staging, ledger)
    staging.close()
    staging, plan = plan_for(tmp_path, ledger, contacts(10))
    assert plan.writes() == 0 and plan.total(Act.UNCHANGED) == 14


def test_edits_voids_additions_and_deletions_are_exact(tmp_path: Path, ledger: Ledger) -> None:
    staging, _ = plan_for(tmp_path, ledger, contacts(20))
    confirm_all(staging, ledger)
    staging.close()
    rows = contacts(22, edited={3, 4, 5}, voided={6})
    rows = [r for r in rows if r[0] != "C7"]  # C7 deleted at the source
    staging, plan = plan_for(tmp_path, ledger, rows)
    c = plan.by_kind["contact"]
    assert (c[Act.UPDATE], c[Act.VOID], c[Act.CREATE], c[Act.DELETE]) == (3, 1, 2, 1)
    assert c[Act.UNCHANGED] == 20 - 3 - 1 - 1
    # the CarePlan lists the contacts that took place (activity.outcomeReference): added, voided and deleted
    # contacts change both participants' CarePlans
    assert plan.by_kind["enrollment"][Act.UPDATE] == 2


def test_contact_edits_that_the_careplan_does_not_show_leave_it_unchanged(tmp_path: Path, ledger: Ledger) -> None:
    staging, _ = plan_for(tmp_path, ledger, contacts(20))
    confirm_all(staging, ledger)
    staging.close()
    staging, plan = plan_for(tmp_path, ledger, contacts(20, edited={3, 4}))  # notes only: C3 (E1) and C4 (E2)
    assert plan.by_kind["contact"][Act.UPDATE] == 2
    assert plan.by_kind["enrollment"][Act.UNCHANGED] == 2


def test_mass_deletion_is_held(tmp_path: Path, ledger: Ledger) -> None:
    staging, _ = plan_for(tmp_path, ledger, contacts(20))
    confirm_all(staging, ledger)
    staging.close()
    staging, plan = plan_for(tmp_path, ledger, contacts(5))  # a truncated export
    assert plan.by_kind["contact"][Act.DELETE] == 0
    assert plan.deletions_held and "more than 20%" in plan.deletions_held[0]


def test_rejected_row_is_not_a_deletion(tmp_path: Path, ledger: Ledger) -> None:
    staging, _ = plan_for(tmp_path, ledger, contacts(10))
    confirm_all(staging, ledger)
    staging.close()
    rows = contacts(10)
    rows[2][3] = "not a date"  # C2 becomes unreadable this run
    staging, plan = plan_for(tmp_path, ledger, rows)
    assert plan.by_kind["contact"][Act.DELETE] == 0


def test_quarantined_content_is_not_resent_until_it_changes(tmp_path: Path, ledger: Ledger) -> None:
    staging, _ = plan_for(tmp_path, ledger, contacts(4))
    for unit in units_to_write(staging, None):  # the supporter landed
        ledger.record_confirmed(unit.unit_key, kind=unit.kind, participant=None, unit_hash=unit.unit_hash or "",
                                voided=False, patient_id=None, resources=[], detail="201", run_id="r")
    for unit in units_to_write(staging, "E1"):
        ledger.record_state(unit.unit_key, kind=unit.kind, participant="E1", state=UnitState.QUARANTINED,
                            detail="400", run_id="r", attempt_hash=unit.unit_hash)
    staging.close()
    staging, plan = plan_for(tmp_path, ledger, contacts(4))
    assert plan.total(Act.QUARANTINED) == 3  # E1's enrollment + C1 + C3
    staging.close()
    staging, plan = plan_for(tmp_path, ledger, contacts(4, edited={1}))
    assert plan.by_kind["contact"][Act.CREATE] == 3  # C1 changed (and C2, C4 were never sent)
    assert plan.by_kind["contact"][Act.RETRY] == 1  # C3 rides along: its participant has changes
    assert plan.by_kind["enrollment"][Act.RETRY] == 1


def test_fingerprint_change_replans_everything(tmp_path: Path, ledger: Ledger) -> None:
    staging, _ = plan_for(tmp_path, ledger, contacts(3))
    confirm_all(staging, ledger)
    staging.close()
    _, plan = plan_for(tmp_path, ledger, contacts(3), fingerprint="fp2")
    assert plan.total(Act.UNCHANGED) == 0 and plan.total(Act.UPDATE) == 7


def test_unit_hashes_are_pinned() -> None:
    """A unit's hash is what the ledger compares: a change to how it is computed re-sends every record."""
    assert _sha("fp", "contact", None, 3, "é") == "13b66798373b1cfcaccb7b20e874280d"
