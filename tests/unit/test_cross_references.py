"""A contact may fulfil only its own participant's planned contact; a record quarantined because what it
refers to had not landed is retried by itself once that has landed."""

from __future__ import annotations

import csv
from pathlib import Path

from connector.plan.ledger import Ledger, UnitState
from connector.plan.planner import Act, compute_plan, units_to_write
from connector.read.profile import load_profile
from connector.read.program import read_program
from connector.read.staging import Staging

PROFILE = load_profile("peersync-template")
FILES = {
    "supporters.csv": [["staff_id", "given_name", "family_name", "title"], ["S1", "Ana", "Lopez", "promotora"]],
    "enrollments.csv": [["enrollment_id", "mrn", "start_date", "status", "supporter_id"],
                        ["E1", "MRN1", "2026-01-05", "active", "S1"], ["E2", "MRN2", "2026-01-06", "active", "S1"]],
    "planned_contacts.csv": [["planned_contact_id", "enrollment_id", "supporter_id", "due_datetime", "mode", "status"],
                             ["P1", "E1", "S1", "2026-02-01 10:00", "telephone", "planned"],
                             ["P2", "E2", "S1", "2026-02-01 10:00", "telephone", "planned"]],
}
CONTACT_HEADER = ["contact_id", "enrollment_id", "supporter_id", "contact_datetime", "mode", "support_types",
                  "planned_contact_id"]


def read(tmp: Path, contacts: list[list[str]], supporter_family_name: str = "Lopez") -> Staging:
    folder = tmp / "in"
    folder.mkdir(exist_ok=True)
    files = dict(FILES, **{"contacts.csv": [CONTACT_HEADER, *contacts]})
    files["supporters.csv"] = [FILES["supporters.csv"][0], ["S1", "Ana", supporter_family_name, "promotora"]]
    for name, rows in files.items():
        with (folder / name).open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(rows)
    staging = Staging()
    read_program(PROFILE, [folder], staging)
    return staging


def contact(cid: str, enrollment: str, planned: str) -> list[str]:
    return [cid, enrollment, "S1", "2026-02-02 10:00", "telephone", "emotional", planned]


def settle(staging: Staging, ledger: Ledger, quarantined: set[str]) -> None:
    """Pretend a sync ran: the server refused ``quarantined`` units and confirmed the others."""
    for participant in (None, "E1", "E2"):
        for unit_key, kind, _sid, unit_hash, _action in units_to_write(staging, participant):
            if unit_key in quarantined:
                ledger.record_state(unit_key, kind=kind, participant=participant, state=UnitState.QUARANTINED,
                                    detail="422", run_id="r1", attempt_hash=unit_hash)
            else:
                ledger.record_confirmed(unit_key, kind=kind, participant=participant, unit_hash=unit_hash or "",
                                        voided=False, patient_id="p", resources=[], detail="201", run_id="r1")


def actions(staging: Staging) -> dict[str, str]:
    return dict(staging.db.execute("SELECT unit_key, action FROM plan").fetchall())


def test_a_contact_fulfilling_another_participants_planned_contact_is_rejected(tmp_path: Path) -> None:
    with read(tmp_path, [contact("C1", "E1", "P1"), contact("C2", "E1", "P2")]) as staging:
        assert staging.counts()["contact"] == 1
        rejects = [r for r in staging.rejects() if r.kind == "contact"]
    assert len(rejects) == 1 and rejects[0].field == "planned_contact_id"
    assert rejects[0].reason == "refers to a planned contact of another participant"
    assert rejects[0].value == "<masked: identifier>"


def test_quarantined_contact_is_retried_once_its_planned_contact_has_landed(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger, read(tmp_path, [contact("C1", "E1", "P1")]) as staging:
        compute_plan(staging, ledger, program_id="demo", fingerprint="fp")
        settle(staging, ledger, {"planned_contact:P1", "contact:C1"})
        plan = compute_plan(staging, ledger, program_id="demo", fingerprint="fp")
        assert plan.total(Act.QUARANTINED) == 2 and plan.writes() == 0  # nothing changed: nothing resent
        # P1 lands outside this plan (a person fixed it on the server side and retried it from the review queue)
        with ledger.transaction() as db:
            db.execute("UPDATE units SET state='sent', hash=attempt_hash, updated_at='9999' "
                       "WHERE unit_key='planned_contact:P1'")
        compute_plan(staging, ledger, program_id="demo", fingerprint="fp")
        assert actions(staging)["contact:C1"] == Act.RETRY


def test_quarantined_contact_rides_along_when_its_supporter_is_written(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        with read(tmp_path, [contact("C1", "E1", "P1")]) as staging:
            compute_plan(staging, ledger, program_id="demo", fingerprint="fp")
            settle(staging, ledger, {"contact:C1"})
        with ledger.transaction() as db:  # quarantined after everything it refers to landed
            db.execute("UPDATE units SET updated_at='9999' WHERE unit_key='contact:C1'")
        with read(tmp_path, [contact("C1", "E1", "P1")]) as staging:
            compute_plan(staging, ledger, program_id="demo", fingerprint="fp")
            assert actions(staging)["contact:C1"] == Act.QUARANTINED
        with read(tmp_path, [contact("C1", "E1", "P1")], supporter_family_name="López") as staging:
            compute_plan(staging, ledger, program_id="demo", fingerprint="fp")
            got = actions(staging)
    # the contact's narrative names its supporter, so the changed supporter changes the contact's hash too: it is
    # re-sent as changed (create: a quarantined unit has no confirmed hash), not merely retried
    assert got["supporter:S1"] == Act.UPDATE and got["contact:C1"] == Act.CREATE
