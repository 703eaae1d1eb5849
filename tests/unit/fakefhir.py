"""A small in-memory FHIR server behind `responses`, for unit tests of the writer (no HAPI needed).

It answers what the writer asks: the CapabilityStatement, Patient searches by MRN, transactions of conditional
updates (by business identifier), PUT by id and POST (search-then-write), conditional-create Provenance on
``_tag``, reads and updates by id, and identifier searches. Every posted transaction is kept (``transactions``)
and ``fail`` lets a test refuse a transaction the way a real server would.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import responses

from connector.write.bundle import identity_of

BASE = "https://ehr.test/fhir"
WRITTEN = ("Organization", "Device", "Practitioner", "PractitionerRole", "CareTeam", "CarePlan", "Goal",
           "Communication", "CommunicationRequest", "ServiceRequest", "Task")

Answer = tuple[int, dict[str, Any]]


def capability_statement(*, conditional_update: bool = True, provenance_conditional_create: bool = True,
                         transaction: bool = True) -> dict[str, Any]:
    """A HAPI-like CapabilityStatement (switches for what the writer adapts to)."""
    resources = [{"type": t, "conditionalUpdate": conditional_update, "conditionalCreate": True} for t in WRITTEN]
    resources.append({"type": "Provenance", "conditionalCreate": provenance_conditional_create})
    resources.append({"type": "Patient"})
    return {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1",
            "rest": [{"mode": "server", "interaction": [{"code": "transaction"}] if transaction else [{"code": "batch"}],
                      "resource": resources}]}


def outcome(code: str, diagnostics: str) -> dict[str, Any]:
    """An OperationOutcome with one error issue."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}


class FakeFhir:
    """The server's state and the `responses` callbacks that read and change it."""

    def __init__(self, rsps: responses.RequestsMock, *, patients: dict[str, str] | None = None,
                 statement: dict[str, Any] | None = None) -> None:
        self.patients = patients or {}  # MRN -> Patient id (any MRN system)
        self.statement = statement or capability_statement()
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}  # (type, id) -> resource
        self.transactions: list[dict[str, Any]] = []  # every transaction posted (as sent)
        self.fail: Callable[[dict[str, Any]], Answer | None] | None = None  # refuse a transaction
        self.down = False  # answer everything with 503
        self._next = 0
        base = re.escape(BASE)
        rsps.add_callback(responses.GET, f"{BASE}/metadata", callback=self._metadata)
        rsps.add_callback(responses.POST, re.compile(rf"{base}/?$"), callback=self._transaction)
        rsps.add_callback(responses.GET, re.compile(rf"{base}/Patient\?.*"), callback=self._patient_search)
        # Patterns must not overlap: responses hands a request matching several to each in turn.
        rsps.add_callback(responses.GET, re.compile(rf"{base}/(?!Patient\?)\w+\?.*"), callback=self._search)
        rsps.add_callback(responses.GET, re.compile(rf"{base}/\w+/[\w.-]+$"), callback=self._read)
        rsps.add_callback(responses.PUT, re.compile(rf"{base}/\w+/[\w.-]+$"), callback=self._update)

    # -- what tests look at ----------------------------------------------------------------------------------------

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        """Every stored resource of one type."""
        return [r for (t, _id), r in self.resources.items() if t == resource_type]

    # -- callbacks -------------------------------------------------------------------------------------------------

    def _reply(self, status: int, body: dict[str, Any]) -> tuple[int, dict[str, str], str]:
        return status, {"Content-Type": "application/fhir+json"}, json.dumps(body)

    def _unavailable(self) -> tuple[int, dict[str, str], str] | None:
        return self._reply(503, outcome("transient", "down for maintenance")) if self.down else None

    def _metadata(self, _request: Any) -> tuple[int, dict[str, str], str]:
        return self._unavailable() or self._reply(200, self.statement)

    def _patient_search(self, request: Any) -> tuple[int, dict[str, str], str]:
        if (down := self._unavailable()) is not None:
            return down
        tokens = parse_qs(urlsplit(request.url).query).get("identifier", [""])[0].split(",")
        found = []
        for token in tokens:
            mrn = token.split("|")[-1]
            if mrn in self.patients:
                found.append({"resourceType": "Patient", "id": self.patients[mrn], "active": True,
                              "identifier": [{"system": token.split("|")[0], "value": mrn}]})
        return self._reply(200, _searchset(found))

    def _search(self, request: Any) -> tuple[int, dict[str, str], str]:
        if (down := self._unavailable()) is not None:
            return down
        parts = urlsplit(request.url)
        resource_type = parts.path.rsplit("/", 1)[1]
        system, _, value = unquote(parse_qs(parts.query)["identifier"][0]).partition("|")
        found = [r for r in self.of_type(resource_type)
                 if any(i.get("system") == system and i.get("value") == value for i in r.get("identifier", []))]
        return self._reply(200, _searchset(found))

    def _read(self, request: Any) -> tuple[int, dict[str, str], str]:
        if (down := self._unavailable()) is not None:
            return down
        resource_type, resource_id = urlsplit(request.url).path.rsplit("/", 2)[1:]
        resource = self.resources.get((resource_type, resource_id))
        if resource is None:
            return self._reply(404, outcome("not-found", f"HAPI-2001: Resource {resource_type} is not known"))
        return self._reply(200, resource)

    def _update(self, request: Any) -> tuple[int, dict[str, str], str]:
        if (down := self._unavailable()) is not None:
            return down
        resource_type, resource_id = urlsplit(request.url).path.rsplit("/", 2)[1:]
        stored = self._store(resource_type, resource_id, json.loads(request.body))
        return self._reply(200, stored)

    def _transaction(self, request: Any) -> tuple[int, dict[str, str], str]:
        if (down := self._unavailable()) is not None:
            return down
        bundle = json.loads(request.body)
        self.transactions.append(copy.deepcopy(bundle))
        refused = self.fail(bundle) if self.fail else None
        if refused is not None:
            return self._reply(*refused)
        answers = [self._entry(entry) for entry in bundle["entry"]]
        return self._reply(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": answers})

    # -- state -----------------------------------------------------------------------------------------------------

    def _entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        request, resource = entry["request"], entry["resource"]
        resource_type = resource["resourceType"]
        if request["method"] == "POST" and request.get("ifNoneExist"):
            code = unquote(request["ifNoneExist"]).rsplit("|", 1)[1]
            for existing in self.of_type(resource_type):
                if any(t.get("code") == code for t in existing.get("meta", {}).get("tag", [])):
                    return {"response": {"status": "200 OK", "location": _location(existing)}}
        if request["method"] == "POST":
            return {"response": {"status": "201 Created", "location": _location(self._store(resource_type, None,
                                                                                             resource))}}
        url = request["url"]
        if "?" in url:  # conditional update by business identifier
            identity = identity_of(resource)
            match = [r for r in self.of_type(resource_type) if identity_of(r) == identity]
            stored = self._store(resource_type, match[0]["id"] if match else None, resource)
            return {"response": {"status": "200 OK" if match else "201 Created", "location": _location(stored)}}
        existing = (resource_type, url.split("/")[1]) in self.resources
        stored = self._store(resource_type, url.split("/")[1], resource)
        return {"response": {"status": "200 OK" if existing else "201 Created", "location": _location(stored)}}

    def _store(self, resource_type: str, resource_id: str | None, resource: dict[str, Any]) -> dict[str, Any]:
        if resource_id is None:
            self._next += 1
            resource_id = f"{resource_type.lower()}-{self._next}"
        previous = self.resources.get((resource_type, resource_id))
        version = int(previous["meta"]["versionId"]) + 1 if previous else 1
        stored = {**copy.deepcopy(resource), "id": resource_id}
        stored["meta"] = {**resource.get("meta", {}), "versionId": str(version)}
        self.resources[(resource_type, resource_id)] = stored
        return stored


def _location(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}/_history/{resource['meta']['versionId']}"


def _searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
