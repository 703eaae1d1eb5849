"""Smoke tests of the FHIR test server itself (plain HTTP with requests, no connector code).

They prove the behaviour the connector relies on: conditional PUT in one transaction with urn:uuid references,
identifier search, no new version for an identical replay, $validate, and $validate against a profile whose
StructureDefinition was uploaded to the server. Every test uses its own identifier systems, so the tests are
isolated from each other and from other data on a shared server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import fhirserver  # tests/fhirserver.py (tests/ is put on sys.path by tests/conftest.py)
import pytest
import requests

from connector.assets import us_core_dir

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"
MR_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}
US_CORE_DIR = us_core_dir()  # shipped in mappings/fhir/us-core-6.1.0
US_CORE_GOAL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-goal"
TIMEOUT = 120  # the first $validate of a profile loads and indexes the R4 core definitions


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers.update({"Accept": FHIR_JSON, "Content-Type": FHIR_JSON})
        yield session


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:12]


def token(system: str, value: str) -> str:
    """``identifier=`` search value: system|value, each percent-encoded (no FHIR escaping needed for these)."""
    return f"{quote(system, safe='')}%7C{quote(value, safe='')}"


def search(http: requests.Session, base: str, resource_type: str, system: str, value: str) -> list[dict[str, Any]]:
    response = http.get(f"{base}/{resource_type}?identifier={token(system, value)}", timeout=TIMEOUT)
    assert response.status_code == 200, response.text[:1000]
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle"
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]


def issues(outcome: dict[str, Any], *severities: str) -> list[dict[str, Any]]:
    assert outcome.get("resourceType") == "OperationOutcome", outcome
    return [i for i in outcome.get("issue", []) if i.get("severity") in severities]


def validate(http: requests.Session, base: str, resource: dict[str, Any], profile: str | None = None) -> dict:
    url = f"{base}/{resource['resourceType']}/$validate"
    if profile:
        url += f"?profile={quote(profile, safe='')}"
    response = http.post(url, json=resource, timeout=TIMEOUT)
    # HAPI answers 200 with the OperationOutcome (412 in some versions when there are errors)
    assert response.status_code in (200, 412), f"{response.status_code} {response.text[:1000]}"
    return response.json()


def test_capability_statement(fhir_base_url: str, http: requests.Session) -> None:
    response = http.get(f"{fhir_base_url}/metadata", timeout=TIMEOUT)
    assert response.status_code == 200
    cs = response.json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    resources = {r["type"]: r for r in cs["rest"][0]["resource"]}
    for resource_type in ("Patient", "Goal", "CarePlan"):
        assert resources[resource_type].get("conditionalUpdate") is True
        assert resources[resource_type].get("conditionalCreate") is True
    interactions = {i["code"] for i in cs["rest"][0].get("interaction", [])}
    assert "transaction" in interactions  # HAPI serves batch through the same interaction


def test_conditional_put_transaction_is_idempotent(fhir_base_url: str, http: requests.Session, uid: str) -> None:
    base = fhir_base_url
    mrn_system = f"https://clinic.example.org/mrn/smoke-{uid}"
    goal_system = f"https://peersync.example.org/smoke-{uid}/sid/goal"
    plan_system = f"https://peersync.example.org/smoke-{uid}/sid/careplan"
    goal_value = "goal 1/a"  # needs percent-encoding in the match URL
    plan_value = "plan+1"  # an unencoded '+' would be read as a space (HAPI-0929)

    # 1. the Patient, with an MRN
    patient = {
        "resourceType": "Patient",
        "identifier": [{"use": "usual", "type": MR_TYPE, "system": mrn_system, "value": "MRN-0001"}],
        "name": [{"family": "Smoke", "given": ["Test"]}],
    }
    response = http.post(f"{base}/Patient", json=patient, timeout=TIMEOUT)
    assert response.status_code == 201, response.text[:1000]
    patient_id = response.json()["id"]
    found = search(http, base, "Patient", mrn_system, "MRN-0001")
    assert [p["id"] for p in found] == [patient_id]

    # 2. one transaction: Goal + CarePlan (goal -> urn:uuid of the Goal), both conditional PUTs
    goal_urn = f"urn:uuid:{uuid.uuid4()}"
    plan_urn = f"urn:uuid:{uuid.uuid4()}"
    subject = {"reference": f"Patient/{patient_id}"}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": goal_urn,
                "resource": {
                    "resourceType": "Goal",
                    "identifier": [{"system": goal_system, "value": goal_value}],
                    "lifecycleStatus": "active",
                    "description": {"text": "Walk 30 minutes a day"},
                    "subject": subject,
                },
                "request": {"method": "PUT", "url": f"Goal?identifier={token(goal_system, goal_value)}"},
            },
            {
                "fullUrl": plan_urn,
                "resource": {
                    "resourceType": "CarePlan",
                    "identifier": [{"system": plan_system, "value": plan_value}],
                    "status": "active",
                    "intent": "plan",
                    "subject": subject,
                    "goal": [{"reference": goal_urn}],
                },
                "request": {"method": "PUT", "url": f"CarePlan?identifier={token(plan_system, plan_value)}"},
            },
        ],
    }
    response = http.post(base, json=bundle, timeout=TIMEOUT)
    assert response.status_code == 200, response.text[:2000]
    result = response.json()
    assert result["type"] == "transaction-response"
    assert [e["response"]["status"].split()[0] for e in result["entry"]] == ["201", "201"]

    # 3. read back by identifier: exactly one of each, CarePlan.goal -> the Goal's real id
    goals = search(http, base, "Goal", goal_system, goal_value)
    plans = search(http, base, "CarePlan", plan_system, plan_value)
    assert len(goals) == 1 and len(plans) == 1
    goal, plan = goals[0], plans[0]
    assert plan["goal"] == [{"reference": f"Goal/{goal['id']}"}]
    assert goal["subject"]["reference"] == plan["subject"]["reference"] == f"Patient/{patient_id}"
    versions = (goal["meta"]["versionId"], plan["meta"]["versionId"])

    # 4. the same bundle again: still one of each, no new version (identical content is not stored again)
    response = http.post(base, json=bundle, timeout=TIMEOUT)
    assert response.status_code == 200, response.text[:2000]
    assert [e["response"]["status"].split()[0] for e in response.json()["entry"]] == ["200", "200"]
    goals_again = search(http, base, "Goal", goal_system, goal_value)
    plans_again = search(http, base, "CarePlan", plan_system, plan_value)
    assert [g["id"] for g in goals_again] == [goal["id"]]
    assert [p["id"] for p in plans_again] == [plan["id"]]
    assert (goals_again[0]["meta"]["versionId"], plans_again[0]["meta"]["versionId"]) == versions
    assert plans_again[0]["goal"] == [{"reference": f"Goal/{goal['id']}"}]


def test_validate_operation(fhir_base_url: str, http: requests.Session) -> None:
    valid = {
        "resourceType": "Goal",
        "lifecycleStatus": "active",
        "description": {"text": "Walk 30 minutes a day"},
        "subject": {"reference": "Patient/example"},
    }
    outcome = validate(http, fhir_base_url, valid)
    assert issues(outcome, "error", "fatal") == []

    invalid = {"resourceType": "Goal", "subject": {"reference": "Patient/example"}}  # no lifecycleStatus, description
    errors = issues(validate(http, fhir_base_url, invalid), "error", "fatal")
    assert errors, "a Goal without lifecycleStatus and description must not validate"
    assert any("Goal.lifecycleStatus" in i.get("diagnostics", "") for i in errors), errors


def test_validate_against_uploaded_us_core_profile(fhir_base_url: str, http: requests.Session) -> None:
    loaded = fhirserver.load_conformance_resources(
        fhir_base_url,
        US_CORE_DIR,
        ["ValueSet-us-core-goal-description.json", "StructureDefinition-us-core-goal.json"],
    )
    assert US_CORE_GOAL in loaded

    valid = {
        "resourceType": "Goal",
        "lifecycleStatus": "active",
        "description": {"text": "Walk 30 minutes a day"},
        "subject": {"reference": "Patient/example"},
    }
    outcome = validate(http, fhir_base_url, valid, profile=US_CORE_GOAL)
    assert issues(outcome, "error", "fatal") == [], outcome
    # the profile was applied: its extensible binding on Goal.description is reported
    assert any("us-core-goal-description" in i.get("diagnostics", "") for i in outcome["issue"]), outcome

    invalid = {"resourceType": "Goal", "lifecycleStatus": "active", "description": {"text": "x"}}  # no subject
    errors = issues(validate(http, fhir_base_url, invalid, profile=US_CORE_GOAL), "error", "fatal")
    assert any(
        "Goal.subject" in i.get("diagnostics", "") and US_CORE_GOAL in i.get("diagnostics", "") for i in errors
    ), errors

    # a profile the server does not have is an error, so the above really used the uploaded one
    unknown = "http://example.org/fhir/StructureDefinition/not-uploaded"
    errors = issues(validate(http, fhir_base_url, valid, profile=unknown), "error", "fatal")
    assert any(unknown in i.get("diagnostics", "") for i in errors), errors
