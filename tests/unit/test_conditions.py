"""CarePlan.addresses: the EHR's own Conditions, found by code at sync time (connector/write/conditions.py)."""

from __future__ import annotations

from typing import Any

import responses

from connector.server.client import FhirClient, RetryPolicy
from connector.write.conditions import ICD10CM, condition_codes, find_condition_refs, matching_condition_ids

BASE = "https://ehr.example.org/fhir"
FAST = RetryPolicy(attempts=0, backoff_factor=0.0, backoff_max=0.0, jitter=0.0, retry_after_cap=0.0)


def condition(cid: str, system: str, code: str, verification: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Condition", "id": cid, "code": {"coding": [{"system": system,
                                                                                        "code": code}]}}
    if verification:
        out["verificationStatus"] = {"coding": [{"code": verification}]}
    return out


def test_condition_codes_take_codes_and_never_guess_from_text() -> None:
    assert condition_codes(["E11.9", " e11.65 ", "I10", "E11.9"]) == [(ICD10CM, "E11.9"), (ICD10CM, "E11.65"),
                                                                       (ICD10CM, "I10")]
    assert condition_codes(["http://snomed.info/sct|44054006"]) == [("http://snomed.info/sct", "44054006")]
    assert condition_codes(["type 2 diabetes", "diabetes", "|E11.9", "", "U07.1x"]) == []


def test_only_exact_codes_that_are_not_in_error_or_refuted_are_linked() -> None:
    wanted = [(ICD10CM, "E11.9")]
    found = [
        condition("1", ICD10CM, "E11.9"),
        condition("2", "http://snomed.info/sct", "E11.9"),  # same code, other system
        condition("3", ICD10CM, "E11.9", "entered-in-error"),
        condition("4", ICD10CM, "E11.9", "refuted"),
        condition("5", ICD10CM, "E11.9", "confirmed"),
        condition("1", ICD10CM, "E11.9"),
    ]
    assert matching_condition_ids(found, wanted) == ["1", "5"]


@responses.activate
def test_find_condition_refs_searches_the_patients_conditions_by_code() -> None:
    responses.get(f"{BASE}/Condition", json={"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": condition("c1", ICD10CM, "E11.9"), "search": {"mode": "match"}}]})
    client = FhirClient(BASE, retry=FAST)
    assert find_condition_refs(client, "p1", ["E11.9", "hypertension"]) == ["Condition/c1"]
    params = responses.calls[0].request.params
    assert params == {"patient": "Patient/p1", "code": f"{ICD10CM}|E11.9"}
    assert find_condition_refs(client, "p1", ["hypertension"]) == []  # nothing to search: no request
    assert len(responses.calls) == 1


@responses.activate
def test_a_failed_condition_search_leaves_addresses_empty() -> None:
    responses.get(f"{BASE}/Condition", status=403, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "forbidden", "diagnostics": "scope"}]})
    assert find_condition_refs(FhirClient(BASE, retry=FAST), "p1", ["E11.9"]) == []
