"""Issue 19 against the real HAPI server: the CarePlan addresses the EHR's own Conditions (found, never created) and
links the contacts that took place; contacts also land as US Core Procedures, idempotently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from connector.identifiers import token_query

from .syncutil import Program, assert_clean_state, demo_summary, make_program, read_csv, trim_inputs

pytestmark = pytest.mark.integration

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
KEEP = {"E0001", "E0002", "E0003"}
REVIEW = (set(demo_summary()["unmatched_enrollments"]) | set(demo_summary()["ambiguous_enrollments"])) & KEEP
FHIR_JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture()
def program(tmp_path: Path, fhir_base_url: str) -> Program:
    program = make_program(tmp_path, fhir_base_url, concurrency=1)
    trim_inputs(program.inputs, KEEP)
    text = program.config.read_text(encoding="utf-8")
    program.config.write_text(text.replace("[server]\n", '[server]\ncontact_procedures = "also"\n'), encoding="utf-8")
    return program


def get(program: Program, query: str) -> list[dict[str, Any]]:
    bundle = requests.get(f"{program.base_url}/{query}", headers=program.headers, timeout=60).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def patient_id(program: Program, mrn: str) -> str:
    (patient,) = get(program, f"Patient?identifier={token_query(program.mrn_system, mrn)}")
    return str(patient["id"])


def add_condition(program: Program, patient: str, code: str, verification: str = "confirmed") -> str:
    condition = {
        "resourceType": "Condition",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                           "code": verification}]},
        "code": {"coding": [{"system": ICD10CM, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    response = requests.post(f"{program.base_url}/Condition", json=condition, headers={**FHIR_JSON, **program.headers},
                             timeout=60)
    response.raise_for_status()
    return str(response.json()["id"])


def test_careplan_addresses_found_conditions_links_outcomes_and_contacts_land_as_procedures(program: Program) -> None:
    enrollments = {r["enrollment_id"]: r for r in read_csv(program.inputs / "enrollments.csv")}
    first = enrollments["E0001"]
    assert "E11.9" in first["conditions"].split(";")
    patient = patient_id(program, first["mrn"])
    diabetes = add_condition(program, patient, "E11.9")
    add_condition(program, patient, "E11.9", verification="entered-in-error")  # must not be linked
    add_condition(program, patient, "I10")  # a Condition the enrollment does not name
    conditions_before = len(get(program, f"Condition?patient=Patient/{patient}"))

    summary = program.sync()
    assert summary.counts["pending"] == 0 and summary.counts["quarantined"] == 0
    found = assert_clean_state(program, REVIEW)  # every identifier once: Procedures included

    ctx = program.context()
    careplans = get(program, f"CarePlan?identifier={token_query(ctx.system('careplan'), 'E0001')}")
    (careplan,) = careplans
    assert careplan["addresses"] == [{"reference": f"Condition/{diabetes}"}]
    assert len(get(program, f"Condition?patient=Patient/{patient}")) == conditions_before  # none created
    assert "author" not in careplan
    assert careplan["extension"][0]["url"] == "http://hl7.org/fhir/us/mcc/StructureDefinition/custodian"

    contacts = [r for r in read_csv(program.inputs / "contacts.csv") if r["enrollment_id"] == "E0001"]
    performed = {r["contact_id"] for r in contacts
                 if r.get("outcome", "completed") in ("", "completed") and r.get("void", "") in ("", "0")}
    outcome_refs = [ref["reference"] for a in careplan["activity"] for ref in a.get("outcomeReference", [])]
    assert all(ref.startswith("Communication/") for ref in outcome_refs)  # rewritten to the server's ids
    linked = {c["identifier"][0]["value"] for c in
              (requests.get(f"{program.base_url}/{ref}", headers=program.headers, timeout=60).json()
               for ref in outcome_refs)}
    assert linked and linked <= performed

    procedures = {k for k in found if k[0] == "Procedure"}
    communications = {k for k in found if k[0] == "Communication"}
    assert procedures and len(procedures) == len(communications)

    again = program.sync()
    assert again.write_requests == 0  # idempotent: nothing changed, nothing sent
    assert_clean_state(program, REVIEW)
