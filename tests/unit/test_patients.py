"""Batched Patient look-up: one OR search per batch, exact matches only, and a fallback for everything else."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import responses

from connector.server.client import FhirClient, RetryPolicy
from connector.write.patients import PatientPrefetch

BASE = "https://ehr.test/fhir"
SYS = "urn:oid:1.2.3"
FAST = RetryPolicy(attempts=0, backoff_factor=0.0, backoff_max=0.0, jitter=0.0)


def patient(pid: str, *identifiers: tuple[str, str]) -> dict:
    return {"resourceType": "Patient", "id": pid,
            "identifier": [{"system": s, "value": v} for s, v in identifiers]}


def searchset(*patients: dict) -> dict:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": p, "search": {"mode": "match"}} for p in patients]}


@responses.activate
def test_one_search_per_batch_exact_matches_and_fallbacks() -> None:
    responses.get(BASE + "/Patient", json=searchset(
        patient("1", (SYS, "M1")),
        patient("2", (SYS, "M2"), ("urn:other", "X")),
        patient("3a", (SYS, "M3")), patient("3b", (SYS, "M3")),  # two Patients share M3: ambiguous
        patient("9", (SYS, "m4")),  # not an exact match for M4: left to the one-participant search
    ))
    cache = PatientPrefetch(FhirClient(BASE, retry=FAST), [(SYS, f"M{i}") for i in range(1, 5)], batch=10)
    assert [p["id"] for p in cache.matches(SYS, "M1")] == ["1"]
    assert [p["id"] for p in cache.matches(SYS, "M2")] == ["2"]
    assert sorted(p["id"] for p in cache.matches(SYS, "M3")) == ["3a", "3b"]
    assert cache.matches(SYS, "M4") is None  # no exact match: the caller searches on its own
    assert cache.matches(SYS, "M5") is None  # not a participant of this run
    assert len(responses.calls) == 1
    query = parse_qs(urlsplit(responses.calls[0].request.url).query)
    assert query["identifier"] == [f"{SYS}|M1,{SYS}|M2,{SYS}|M3,{SYS}|M4"]


@responses.activate
def test_batches_follow_the_write_order_and_are_fetched_once() -> None:
    responses.get(BASE + "/Patient", json=searchset(patient("1", (SYS, "M1")), patient("2", (SYS, "M2"))))
    responses.get(BASE + "/Patient", json=searchset(patient("3", (SYS, "M3"))))
    cache = PatientPrefetch(FhirClient(BASE, retry=FAST), [(SYS, "M1"), (SYS, "M2"), (SYS, "M3")], batch=2,
                            ahead=False)
    assert cache.matches(SYS, "M1") and cache.matches(SYS, "M2")
    assert len(responses.calls) == 1
    assert [p["id"] for p in cache.matches(SYS, "M3")] == ["3"]
    assert len(responses.calls) == 2


@responses.activate
def test_a_refused_batch_search_falls_back_to_one_search_each() -> None:
    responses.get(BASE + "/Patient", status=400, json={"resourceType": "OperationOutcome", "issue": []})
    cache = PatientPrefetch(FhirClient(BASE, retry=FAST), [(SYS, "M1"), (SYS, "M2")], batch=10)
    assert cache.matches(SYS, "M1") is None and cache.matches(SYS, "M2") is None
    assert len(responses.calls) == 1  # the failed batch is not retried for every participant


@responses.activate
def test_the_next_batch_is_searched_ahead_in_the_background() -> None:
    known = {"M1": patient("1", (SYS, "M1")), "M2": patient("2", (SYS, "M2")), "M3": patient("3", (SYS, "M3"))}

    def answer(request: Any) -> tuple[int, dict, str]:  # the batches may arrive in either order
        wanted = parse_qs(urlsplit(request.url).query)["identifier"][0].split(",")
        return 200, {}, json.dumps(searchset(*(known[w.split("|")[1]] for w in wanted)))

    responses.add_callback(responses.GET, BASE + "/Patient", callback=answer)
    cache = PatientPrefetch(FhirClient(BASE, retry=FAST), [(SYS, "M1"), (SYS, "M2"), (SYS, "M3")], batch=2)
    assert [p["id"] for p in cache.matches(SYS, "M1")] == ["1"]
    cache.close()  # waits for the look-ahead of the second batch
    searched = [parse_qs(urlsplit(c.request.url).query)["identifier"] for c in responses.calls]
    assert sorted(searched) == sorted([[f"{SYS}|M1,{SYS}|M2"], [f"{SYS}|M3"]])
    assert [p["id"] for p in cache.matches(SYS, "M3")] == ["3"]
    assert [p["id"] for p in cache.matches(SYS, "M2")] == ["2"]
    assert len(responses.calls) == 2  # each batch once, whichever thread searched it
