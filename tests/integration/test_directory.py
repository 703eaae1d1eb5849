"""Existing directory resources against the local HAPI server: with ``[directory]`` set, the demo sync writes no
Organization, Practitioner nor PractitionerRole of its own, refers to the seeded ones by server id (every stored
reference resolves), sends the participants of a supporter the EHR lacks to review (practitioner-not-found), and
lands them on the first run after the supporter's Practitioner appears."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import requests

from connector.map.directory import NPI_SYSTEM, PRACTITIONER_NOT_FOUND
from connector.ops.references import check_references
from connector.plan.ledger import Ledger, UnitState
from connector.wiring import build_client

from .syncutil import Program, assert_clean_state, demo_summary, make_program, read_csv, server_resources, write_csv

pytestmark = pytest.mark.integration

SUMMARY = demo_summary()
REVIEW = set(SUMMARY["unmatched_enrollments"]) | set(SUMMARY["ambiguous_enrollments"])
MISSING = "S005"  # the supporter the EHR does not know at first


def post(program: Program, resource: dict) -> str:
    response = requests.post(f"{program.base_url}/{resource['resourceType']}", json=resource, timeout=60,
                             headers={"Content-Type": "application/fhir+json", **program.headers})
    response.raise_for_status()
    return str(response.json()["id"])


def practitioner(npi: str) -> dict:
    return {"resourceType": "Practitioner", "identifier": [{"system": NPI_SYSTEM, "value": npi}], "active": True,
            "name": [{"family": "Seeded", "given": ["EHR"]}]}


def participants_of(program: Program, supporter_id: str) -> set[str]:
    """Participants with any record naming the supporter (all of them need the supporter's Practitioner)."""
    inputs = program.inputs
    goals = {r["goal_id"]: r["enrollment_id"] for r in read_csv(inputs / "goals.csv")}
    found = {r["enrollment_id"] for name in ("enrollments", "contacts", "goals", "planned_contacts", "referrals")
             for r in read_csv(inputs / f"{name}.csv") if r.get("supporter_id") == supporter_id}
    return found | {goals[r["goal_id"]] for r in read_csv(inputs / "goal_notes.csv")
                    if r.get("supporter_id") == supporter_id and r["goal_id"] in goals}


@pytest.fixture()
def program(tmp_path: Path, fhir_base_url: str) -> Program:
    return make_program(tmp_path, fhir_base_url)


def test_existing_organization_and_practitioners_are_referenced_and_a_missing_one_waits_in_review(
        program: Program) -> None:
    # The EHR's directory: the clinic's Organization and a Practitioner per supporter but one, by NPI.
    org_system, org_value = f"urn:test:{program.program_id}:organizations", "clinic-1"
    org_id = post(program, {"resourceType": "Organization", "name": "Seeded clinic",
                            "identifier": [{"system": org_system, "value": org_value}]})
    rows = read_csv(program.inputs / "supporters.csv")
    rng = random.Random(program.program_id)
    npis = {r["staff_id"]: str(rng.randrange(10**9, 10**10)) for r in rows}
    write_csv(program.inputs / "supporters.csv", [r | {"npi": npis[r["staff_id"]]} for r in rows])
    ids = {s: post(program, practitioner(npi)) for s, npi in npis.items() if s != MISSING}
    with program.config.open("a", encoding="utf-8") as config:
        config.write(f'[directory]\norganization = "existing"\norganization_identifier = "{org_system}|{org_value}"\n'
                     'practitioners = "existing"\n')

    waiting = participants_of(program, MISSING) - REVIEW
    assert waiting, "the demo must have participants of the missing supporter"
    summary = program.sync()
    assert summary.exit_code == 65  # as for unmatched patients (the demo also has rejects and unmatched MRNs)
    assert summary.counts["pending"] == 0 and summary.counts["quarantined"] == 0
    found = assert_clean_state(program, REVIEW | waiting)
    # nothing of peersync's own directory: no Organization of the program, no Practitioner, no PractitionerRole
    assert not [k for k in found if k[0] in ("Practitioner", "PractitionerRole") or k[1].startswith("organization|")]
    contact = read_csv(program.inputs / "contacts.csv")
    landed = next(r for r in contact if r["supporter_id"] != MISSING and r["enrollment_id"] not in REVIEW | waiting
                  and ("Communication", f"contact|{r['contact_id']}") in found and r["outcome"] != "cancelled")
    sender = found[("Communication", f"contact|{landed['contact_id']}")][0]["sender"]["reference"]
    assert sender == f"Practitioner/{ids[landed['supporter_id']]}"
    careplan = next(v[0] for k, v in found.items() if k[0] == "CarePlan")
    # MCC eCare Plan: the program Organization is custodian and contributor (the EHR's own, by id)
    assert f"Organization/{org_id}" in {c.get("reference") for c in careplan["contributor"]}
    assert not check_references(build_client(program.settings()), program.context()).broken
    with Ledger(program.settings().sync.ledger) as ledger:
        open_entries = {(r["subject"], r["reason"]) for r in ledger.reviews()}
        assert (f"supporter:{MISSING}", PRACTITIONER_NOT_FOUND) in open_entries
        in_review = {u.participant for u in ledger.units_in_state(UnitState.REVIEW)
                     if str(u.detail).startswith(PRACTITIONER_NOT_FOUND)}
        assert in_review == waiting

    # The EHR adds the supporter: the next run finds them and lands what waited; nothing is written twice.
    ids[MISSING] = post(program, practitioner(npis[MISSING]))
    summary = program.sync()
    assert summary.counts["pending"] == 0 and summary.counts["quarantined"] == 0
    found = assert_clean_state(program, REVIEW)
    assert not [k for k in found if k[0] in ("Practitioner", "PractitionerRole") or k[1].startswith("organization|")]
    assert not check_references(build_client(program.settings()), program.context()).broken
    with Ledger(program.settings().sync.ledger) as ledger:
        assert (f"supporter:{MISSING}", PRACTITIONER_NOT_FOUND) not in {(r["subject"], r["reason"])
                                                                       for r in ledger.reviews()}
    # an unchanged re-sync writes nothing
    assert program.sync().write_requests == 0
    # the seeded Practitioners are the only ones with these NPIs: peersync created none
    total = requests.get(f"{program.base_url}/Practitioner",
                         params={"identifier": ",".join(f"{NPI_SYSTEM}|{n}" for n in npis.values()),
                                 "_summary": "count"}, headers=program.headers, timeout=60).json()["total"]
    assert total == len(npis)


def test_a_missing_organization_holds_everything_in_review(program: Program) -> None:
    with program.config.open("a", encoding="utf-8") as config:
        config.write(f'[directory]\norganization = "existing"\n'
                     f'organization_identifier = "urn:test:{program.program_id}:organizations|nowhere"\n')
    summary = program.sync()
    assert summary.exit_code == 65
    assert summary.counts["created"] == summary.counts["updated"] == 0
    assert server_resources(program) == {}  # every record needs the Organization (at least its Provenance does)
    with Ledger(program.settings().sync.ledger) as ledger:
        assert (f"organization:{program.program_id}", "organization-not-found") in {
            (r["subject"], r["reason"]) for r in ledger.reviews()}

