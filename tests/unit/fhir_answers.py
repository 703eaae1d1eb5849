"""Canned FHIR server answers for unit tests of the writer over `responses` (no server, no server state).

Each helper builds one realistic answer, shaped like HAPI FHIR's: a CapabilityStatement, a ``searchset`` Bundle,
an OperationOutcome with a HAPI message id, a resource as a server returns it on a read, and the
``transaction-response`` to a given transaction (one entry per request entry, each with a status and a
``Type/id/_history/n`` location). Nothing here stores resources or resolves conditions: a server id is derived
from the request entry itself (its conditional URL, ``Type/id`` or fullUrl), so the same conditional update
always gets the same id, as it would on a server, without the test keeping any state.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import Any

import responses
from requests import PreparedRequest

BASE = "https://ehr.test/fhir"
WRITTEN = ("Organization", "Device", "Practitioner", "PractitionerRole", "CareTeam", "CarePlan", "Goal",
           "Communication", "CommunicationRequest", "ServiceRequest", "Task")
FHIR_JSON = {"Content-Type": "application/fhir+json"}

Bundle = dict[str, Any]
Refusal = tuple[int, dict[str, Any]]
Callback = Callable[[PreparedRequest], tuple[int, dict[str, str], str]]


def capability_statement(*, conditional_update: bool = True, provenance_conditional_create: bool = True,
                         transaction: bool = True) -> dict[str, Any]:
    """A HAPI-like CapabilityStatement (switches for what the writer adapts to)."""
    resources = [{"type": t, "conditionalUpdate": conditional_update, "conditionalCreate": True} for t in WRITTEN]
    resources.append({"type": "Provenance", "conditionalCreate": provenance_conditional_create})
    resources.append({"type": "Patient"})
    return {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1",
            "software": {"name": "HAPI FHIR Server", "version": "8.0.0"},
            "rest": [{"mode": "server", "interaction": [{"code": "transaction" if transaction else "batch"}],
                      "resource": resources}]}


def outcome(code: str, diagnostics: str) -> dict[str, Any]:
    """An OperationOutcome with one error issue (``diagnostics`` as HAPI words it, message id first)."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}


def searchset(resources: list[dict[str, Any]]) -> Bundle:
    """A ``searchset`` Bundle whose entries all match."""
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "link": [{"relation": "self", "url": f"{BASE}/search"}],
            "entry": [{"fullUrl": f"{BASE}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                      for r in resources]}


def patient(patient_id: str, system: str, mrn: str) -> dict[str, Any]:
    """An active Patient with one MRN."""
    return {"resourceType": "Patient", "id": patient_id, "meta": {"versionId": "1"}, "active": True,
            "identifier": [{"system": system, "value": mrn}]}


def server_id(entry: dict[str, Any]) -> str:
    """The id a server gives a request entry: the id of a PUT by id, else a number derived from the condition
    (or, for a plain POST, the fullUrl), so one conditional URL always names one resource."""
    url = entry["request"]["url"]
    if "/" in url and "?" not in url:
        return url.split("/", 1)[1]
    return str(zlib.crc32((url + entry.get("fullUrl", "")).encode()))


def as_stored(resource: dict[str, Any], resource_id: str, version: int = 1) -> dict[str, Any]:
    """A resource as a server returns it on a read: with its id and meta.versionId."""
    return {**resource, "id": resource_id, "meta": {**resource.get("meta", {}), "versionId": str(version)}}


def transaction_response(bundle: Bundle, *, status: str = "201 Created", version: int = 1) -> Bundle:
    """The ``transaction-response`` to ``bundle``: one entry per request entry with ``status`` and a location.
    A PUT by id (an update of a known resource) answers ``200 OK`` at the next version."""
    entries = []
    for entry in bundle["entry"]:
        resource_type = entry["resource"]["resourceType"]
        by_id = entry["request"]["method"] == "PUT" and "?" not in entry["request"]["url"]
        answer_status, answer_version = ("200 OK", version + 1) if by_id else (status, version)
        entries.append({"response": {"status": answer_status,
                                     "location": f"{resource_type}/{server_id(entry)}/_history/{answer_version}",
                                     "etag": f'W/"{answer_version}"', "lastModified": "2026-07-01T12:00:00.000+00:00"}})
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}


def reply(status: int, body: dict[str, Any]) -> tuple[int, dict[str, str], str]:
    """A `responses` callback result with a FHIR JSON body."""
    return status, FHIR_JSON, json.dumps(body)


def answer_transactions(refuse: Callable[[Bundle], Refusal | None] | None = None) -> Callback:
    """A callback answering every transaction with its transaction-response, except those ``refuse`` (a pure
    function of the request bundle) answers with an error."""
    def callback(request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        bundle = json.loads(request.body or b"{}")
        refused = refuse(bundle) if refuse else None
        return reply(*refused) if refused else reply(200, transaction_response(bundle))
    return callback


def sent_transactions(rsps: responses.RequestsMock) -> list[Bundle]:
    """Every transaction the writer posted, in order (as sent)."""
    return [json.loads(c.request.body) for c in rsps.calls if c.request.method == "POST"]


def landed(rsps: responses.RequestsMock) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(request entry, response entry) of every transaction answered with a transaction-response."""
    pairs = []
    for call in rsps.calls:
        if call.request.method != "POST" or getattr(call.response, "status_code", None) != 200:
            continue
        pairs.extend(zip(json.loads(call.request.body)["entry"], call.response.json()["entry"], strict=True))
    return pairs
