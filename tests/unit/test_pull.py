"""The pure parts of ``peersync pull``: which clinic referral Tasks are deliverable, the intake row, the
community referral status, the clinical facts, and the Task steps an enrollment means."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import pytest

from connector.map.context import MappingContext
from connector.map.requests import keep_organization_fields
from connector.model import Comparator, Enrollment, EnrollmentStatus, GoalTarget, TargetMeasure
from connector.pull import clinical
from connector.pull.answers import DesiredTask, apply_step, desired_task, task_steps
from connector.pull.community import referral_status
from connector.pull.inbound import DELIVERED_TAG_CODE, inbound_referrals, ref_id
from connector.pull.intake import intake_columns, intake_row
from connector.read.profile import load_profile

MRN_SYSTEM = "urn:oid:1.2.3"
TAGS = "https://example.org/peersync/p1/pull"
PEER = "http://snomed.info/sct|103698003"


def bundle(**overrides: Any) -> tuple[list[dict[str, Any]], dict[tuple[str, str], dict[str, Any]]]:
    patient = {"resourceType": "Patient", "id": "p1", "identifier": [{"system": MRN_SYSTEM, "value": "M1"}],
               "name": [{"given": ["Rosa"], "family": "Delgado"}],
               "telecom": [{"system": "email", "value": "x@y"}, {"system": "phone", "value": "555-0100", "use": "home"},
                           {"system": "phone", "value": "555-0199", "use": "mobile"}],
               "communication": [{"language": {"coding": [{"code": "en"}]}},
                                 {"language": {"coding": [{"code": "es"}]}, "preferred": True}]}
    request = {"resourceType": "ServiceRequest", "id": "sr1", "status": "active", "authoredOn": "2026-11-30T10:00:00Z",
               "code": {"coding": [{"system": "http://snomed.info/sct", "code": "103698003"}]},
               "reasonCode": [{"text": "HbA1c 9.1 %"}], "requester": {"display": "Dr. Ana Ruiz"}}
    task = {"resourceType": "Task", "id": "t1", "meta": {"versionId": "1"}, "status": "requested",
            "owner": {"reference": "Organization/org1"}, "for": {"reference": "Patient/p1"},
            "focus": {"reference": "ServiceRequest/sr1"}}
    for key, value in overrides.items():
        kind, _, element = key.partition("__")
        target = {"task": task, "patient": patient, "request": request}[kind]
        if value is None:
            target.pop(element, None)
        else:
            target[element] = value
    included = {("Patient", "p1"): patient, ("ServiceRequest", "sr1"): request}
    return [task], included


def sort(**overrides: Any) -> tuple[list[Any], list[Any]]:
    tasks, included = bundle(**overrides)
    return inbound_referrals(tasks, included, owner_id="org1", mrn_system=MRN_SYSTEM,
                             accepted_codes=frozenset({PEER}), tag_system=TAGS)


def test_a_complete_referral_is_deliverable_with_what_the_program_needs() -> None:
    (referral,), skipped = sort()
    assert skipped == []
    assert (referral.task_id, referral.mrn) == ("t1", "M1")
    assert (referral.given_name, referral.family_name) == ("Rosa", "Delgado")
    assert (referral.phone, referral.language, referral.referral_date) == ("555-0199", "es", "2026-11-30")
    assert (referral.reason, referral.referring_clinician) == ("HbA1c 9.1 %", "Dr. Ana Ruiz")
    assert not referral.delivered_before


@pytest.mark.parametrize(("override", "reason"), [
    ({"task__for": None}, "names no Patient"),
    ({"task__for": {"reference": "Patient/gone"}}, "Patient/gone is not in the answer"),
    ({"patient__identifier": [{"system": "urn:other", "value": "9"}]}, "no MRN in the configured system"),
    ({"request__code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]}}, "does not take"),
    ({"task__owner": {"reference": "Organization/other"}}, "owned by another organization"),
    ({"task__focus": None}, "no ServiceRequest focus"),
    ({"task__status": "cancelled"}, "not open for intake"),
    ({"request__status": "revoked"}, "ServiceRequest/sr1 is revoked"),
    ({"task__id": None}, "not a Task with an id"),
])
def test_each_bad_referral_is_skipped_with_a_reason(override: dict[str, Any], reason: str) -> None:
    found, (skipped,) = sort(**override)
    assert found == [] and reason in skipped.reason
    assert "Rosa" not in skipped.reason and "M1" not in skipped.reason  # no patient data in reasons


def test_an_empty_code_list_accepts_any_service_and_the_tag_marks_delivered() -> None:
    tasks, included = bundle(task__meta={"versionId": "3", "tag": [{"system": TAGS, "code": DELIVERED_TAG_CODE}]},
                             request__code={"coding": [{"system": "urn:x", "code": "y"}]})
    (referral,), _ = inbound_referrals(tasks, included, owner_id="org1", mrn_system=MRN_SYSTEM,
                                       accepted_codes=frozenset(), tag_system=TAGS)
    assert referral.delivered_before and referral.task_version == "3"


def test_ref_id_reads_literal_references_only() -> None:
    assert ref_id({"reference": "Patient/p1"}, "Patient") == "p1"
    assert ref_id({"reference": "https://ehr/fhir/Patient/p1/_history/2"}, "Patient") == "p1"
    assert ref_id({"reference": "Patient?identifier=x|1"}, "Patient") is None
    assert ref_id({"reference": "Group/p1"}, "Patient") is None


def test_the_intake_row_uses_the_profiles_column_names() -> None:
    (referral,), _ = sort()
    columns = intake_columns(load_profile("redcap-example"))
    row = intake_row(referral, columns)
    assert row[columns["mrn"]] == "M1" and row[columns["clinic_referral"]] == "t1"
    assert columns["mrn"] != "mrn" or "mrn" in row  # a profile's own name, or the field's where it has none
    assert row["phone"] == "555-0199" and row["referring_clinician"] == "Dr. Ana Ruiz"


def test_a_version_peersync_did_not_write_belongs_to_the_organization() -> None:
    task = {"id": "9", "meta": {"versionId": "4", "lastUpdated": "2026-12-01T10:00:00Z"}, "status": "completed",
            "identifier": [{"system": "urn:ref", "value": "R1"}], "statusReason": {"text": "done"},
            "output": [{"type": {"text": "x"}, "valueReference": {"reference": "Procedure/1"}}]}
    theirs = referral_status(task, referral_system="urn:ref", written_versions={"2"})
    assert theirs is not None
    assert (theirs.changed_by, theirs.status, theirs.outputs, theirs.status_reason) == (
        "organization", "completed", ("Procedure/1",), "done")
    ours = referral_status(task, referral_system="urn:ref", written_versions={"4"})
    assert ours is not None and ours.changed_by == "program"
    assert referral_status(task, referral_system="urn:other", written_versions=set()) is None


def test_the_mapper_keeps_the_organizations_elements() -> None:
    mapped = {"resourceType": "Task", "status": "requested", "note": [{"text": "new"}]}
    server = {"status": "completed", "output": [{"valueString": "ok"}], "lastModified": "2026-12-01"}
    kept = keep_organization_fields(mapped, server)
    assert kept == {"resourceType": "Task", "status": "completed", "note": [{"text": "new"}],
                    "output": [{"valueString": "ok"}], "lastModified": "2026-12-01"}


def obs(code: str, value: float | None, when: str, status: str = "final", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"status": status, "code": {"coding": [{"system": clinical.LOINC, "code": code}]},
                           "effectiveDateTime": when, **extra}
    if value is not None:
        out["valueQuantity"] = {"value": value, "unit": "%"}
    return out


def test_the_latest_usable_a1c_and_blood_pressure() -> None:
    bp = obs(clinical.BP_PANEL, None, "2026-11-01", component=[
        {"code": {"coding": [{"system": clinical.LOINC, "code": clinical.SYSTOLIC}]},
         "valueQuantity": {"value": 131, "unit": "mm[Hg]"}},
        {"code": {"coding": [{"system": clinical.LOINC, "code": clinical.DIASTOLIC}]},
         "valueQuantity": {"value": 85, "unit": "mm[Hg]"}}])
    found = [obs(clinical.HBA1C, 8.1, "2026-09-01", id="a1"), obs(clinical.HBA1C, 7.2, "2026-11-15", id="a2"),
             obs(clinical.HBA1C, 5.0, "2026-12-01", status="entered-in-error", id="a3"), bp]
    # the Observation's id too: what a goal's outcome_observation may name (Goal.outcomeReference)
    assert clinical.latest_a1c(found) == clinical.Measurement("7.2", "%", "2026-11-15", "Observation/a2")
    assert clinical.latest_blood_pressure(found) == clinical.Measurement("131/85", "mm[Hg]", "2026-11-01")
    assert clinical.latest_a1c([]) is None
    target = GoalTarget(measure=TargetMeasure.HBA1C, comparator=Comparator.LT, value=Decimal("7.0"), unit="%")
    latest = {TargetMeasure.HBA1C: clinical.latest_a1c(found)}
    assert clinical.target_progress(target, latest) == "latest 7.2 % on 2026-11-15; target < 7.0 %"
    steps = GoalTarget(measure=TargetMeasure.STEPS_PER_DAY, value=Decimal(7000))
    assert clinical.target_progress(steps, latest) == ""  # reported to the program, never an EHR result


def test_weight_and_fasting_glucose_targets_show_the_latest_ehr_value() -> None:
    def obs(code: str, value: float, unit: str, when: str, status: str = "final") -> dict[str, Any]:
        return {"resourceType": "Observation", "id": f"{code}-{when}", "status": status,
                "code": {"coding": [{"system": clinical.LOINC, "code": code}]}, "effectiveDateTime": when,
                "valueQuantity": {"value": value, "unit": unit}}

    found = [obs(clinical.BODY_WEIGHT, 92.5, "kg", "2026-10-01"), obs(clinical.BODY_WEIGHT, 90.1, "kg", "2026-11-20"),
             obs(clinical.BODY_WEIGHT, 70, "kg", "2026-11-30", status="entered-in-error"),
             obs(clinical.FASTING_GLUCOSE, 131, "mg/dL", "2026-11-02")]
    latest = {m: v for m, code in clinical.EHR_MEASURES.items() if (v := clinical.latest_quantity(found, code))}
    assert set(latest) == {TargetMeasure.BODY_WEIGHT, TargetMeasure.FASTING_GLUCOSE}
    weight = GoalTarget(measure=TargetMeasure.BODY_WEIGHT, comparator=Comparator.LE, value=Decimal(88), unit="kg")
    glucose = GoalTarget(measure=TargetMeasure.FASTING_GLUCOSE, comparator=Comparator.LT, value=Decimal(130),
                         unit="mg/dL")
    a1c = GoalTarget(measure=TargetMeasure.HBA1C, comparator=Comparator.LT, value=Decimal(7), unit="%")
    assert clinical.target_progress(weight, latest) == "latest 90.1 kg on 2026-11-20; target <= 88 kg"
    assert clinical.target_progress(glucose, latest) == "latest 131 mg/dL on 2026-11-02; target < 130 mg/dL"
    assert clinical.target_progress(a1c, latest) == ""  # no HbA1c on the EHR: nothing shown, nothing invented


def test_upcoming_appointments_are_booked_future_ones_in_order() -> None:
    found = [{"status": "booked", "start": "2027-02-01T09:00:00Z"}, {"status": "cancelled", "start": "2027-01-01"},
             {"status": "booked", "start": "2026-01-01T09:00:00Z"},
             {"status": "pending", "start": "2027-01-10T09:00:00Z", "serviceType": [{"text": "Eye exam"}]}]
    assert clinical.upcoming_appointments(found, today="2026-12-03") == ["2027-01-10T09:00 Eye exam",
                                                                         "2027-02-01T09:00"]


@pytest.mark.parametrize(("current", "desired", "steps"), [
    ("requested", "in-progress", ["accepted", "in-progress"]),
    ("received", "in-progress", ["accepted", "in-progress"]),
    ("accepted", "in-progress", ["in-progress"]),
    ("in-progress", "in-progress", []),
    ("received", "completed", ["accepted", "in-progress", "completed"]),
    ("in-progress", "completed", ["completed"]),
    ("on-hold", "completed", ["in-progress", "completed"]),
    ("received", "cancelled", ["cancelled"]),  # declined before the program accepted it: never "rejected"
    ("in-progress", "cancelled", ["cancelled"]),
    ("in-progress", "on-hold", ["on-hold"]),
    ("cancelled", "in-progress", []),  # the EHR ended it: never reopened
    ("completed", "completed", []),
    ("entered-in-error", "completed", []),
])
def test_task_steps(current: str, desired: str, steps: list[str]) -> None:
    assert task_steps(current, desired) == steps


def enrollment(status: EnrollmentStatus) -> Enrollment:
    return Enrollment(enrollment_id="E1", mrn="M1", start_date=date(2026, 1, 5), supporter_id="S1", status=status,
                      clinic_referral="t1")


@pytest.mark.parametrize(("status", "task", "reason"), [
    (EnrollmentStatus.ACTIVE, "in-progress", None),
    (EnrollmentStatus.ON_HOLD, "on-hold", None),
    (EnrollmentStatus.DECLINED, "cancelled", "participant-declined"),
    (EnrollmentStatus.NOT_REACHED, "cancelled", "not-reachable"),
    (EnrollmentStatus.WITHDRAWN, "cancelled", "participant-withdrew"),
])
def test_what_an_enrollment_status_means_for_the_clinics_task(status: EnrollmentStatus, task: str,
                                                               reason: str | None) -> None:
    desired = desired_task(enrollment(status), [], [])
    assert desired.status == task and (desired.reason[0] if desired.reason else None) == reason


def test_a_step_sets_the_coded_reason_and_keeps_other_systems_outputs() -> None:
    ctx = MappingContext(program_id="p1", program_name="P", base_url="https://example.org", mrn_system=MRN_SYSTEM)
    task = {"id": "t1", "meta": {"versionId": "2"}, "status": "in-progress",
            "output": [{"type": {"text": "clinic note"}, "valueString": "x"},
                       {"type": {"text": "Peer support care plan"}, "valueReference": {"reference": "CarePlan/old"}}]}
    done = apply_step(task, "completed", DesiredTask("completed", summary="3 contacts"), careplan_id="cp1",
                      now="2026-12-03T10:00:00+00:00", ctx=ctx)
    assert "meta" not in done and done["status"] == "completed"
    assert [o.get("valueString") or o["valueReference"]["reference"] for o in done["output"]] == [
        "x", "CarePlan/cp1", "3 contacts"]
    declined = apply_step(task, "cancelled", DesiredTask("cancelled", ("participant-withdrew", "Participant withdrew")),
                          careplan_id=None, now="2026-12-03T10:00:00+00:00", ctx=ctx)
    assert declined["statusReason"]["coding"][0] == {"system": ctx.code_system("referral-status-reason"),
                                                     "code": "participant-withdrew", "display": "Participant withdrew"}


def test_doctor_names_the_scopes_pull_needs() -> None:
    from connector.ops.doctor import Report, Status, _check_pull_scopes

    report = Report(None)
    _check_pull_scopes(report, ["system/Organization.rs", "system/Task.rus", "system/ServiceRequest.rs",
                                "system/Patient.rs", "system/Practitioner.rs", "system/PractitionerRole.rs"],
                       clinical=True)
    (check,) = [c for c in report.checks if c.name == "auth.scopes.pull"]
    assert check.status is Status.WARN
    assert "system/Observation.rs" in check.detail and "system/Appointment.rs" in check.detail
    report = Report(None)
    _check_pull_scopes(report, ["system/*.cruds"], clinical=True)
    assert [c.status for c in report.checks] == [Status.PASS]
