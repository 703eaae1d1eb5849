"""Server limits and refused types outside a transaction (issue 15): the batch and single write paths classify
each refused request and each refused batch entry with the transaction path's function, park refused types,
adapt the batch size, and quarantine only data errors. A unit with one refused type (CareTeam in the enrollment
unit) is sent without it: its CarePlan and everything referring to it land, with no reference to what the
server does not have.

The server here is a small fake over `responses` that keeps what it stored (so stored references can be checked)
and refuses by rule: per type (403), above a bundle size (400), per batch entry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import responses
from requests import PreparedRequest

from connector.errors import AuthError, ExitCode
from connector.plan.ledger import Ledger, UnitState
from tests.unit.fhir_answers import BASE, capability_statement, outcome, reply, searchset, server_id
from tests.unit.test_writer import Program, answer_patient_search

MEDPLUM_TOO_MANY = "Transaction requires strict isolation but has too many entries"
PATIENTS = {"Patient/p1", "Patient/p2"}


@dataclass
class FakeServer:
    """Stores what it accepts by ``Type/id``; refuses writes of ``refused`` types (403, naming the type) and
    batches of more than ``max_entries`` entries (400, stating the limit or, ``stated`` False, Medplum's words)."""

    refused: set[str] = field(default_factory=set)
    max_entries: int | None = None
    stated: bool = True
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)  # entries per batch, refused ones included
    refusals: list[str] = field(default_factory=list)  # why each refusal (type or "too-many")
    writes: int = 0  # write requests (a batch counts once)

    def install(self, rsps: responses.RequestsMock, *, transaction: bool = False) -> None:
        rsps.add(responses.GET, f"{BASE}/metadata", json=capability_statement(transaction=transaction))
        answer_patient_search(rsps, "MRN1", "p1")
        answer_patient_search(rsps, "MRN2", "p2")
        searches = re.compile(rf"{re.escape(BASE)}/(?!Patient)[A-Z]\w+\?.*")  # Patient: answered above
        rsps.add_callback(responses.GET, searches, callback=self._search)
        rsps.add_callback(responses.POST, f"{BASE}/", callback=self._batch)
        for method in (responses.PUT, responses.POST):
            rsps.add_callback(method, re.compile(rf"{re.escape(BASE)}/[A-Z]\w+.*"), callback=self._single)

    def _search(self, request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        return reply(200, searchset([]))  # nothing is found by identifier: a first sync

    def _write(self, method: str, url: str, resource: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(status, OperationOutcome or stored resource) for one write."""
        resource_type = re.split(r"[/?]", url, maxsplit=1)[0]
        if resource_type in self.refused:
            self.refusals.append(resource_type)
            return 403, outcome("forbidden", f"This client is not permitted to write {resource_type} resources")
        entry = {"request": {"method": method, "url": url}, "fullUrl": ""}
        stored = {**resource, "id": server_id(entry), "meta": {"versionId": "1"}}
        self.stored[f"{resource_type}/{stored['id']}"] = stored
        return 201, stored

    def _single(self, request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        self.writes += 1
        url = unquote(str(request.url).removeprefix(f"{BASE}/"))
        status, body = self._write(str(request.method), url, json.loads(request.body or b"{}"))
        headers = {"Location": f"{BASE}/{body['resourceType']}/{body['id']}/_history/1"} if status == 201 else {}
        return status, {"Content-Type": "application/fhir+json", **headers}, json.dumps(body)

    def _batch(self, request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        self.writes += 1
        bundle = json.loads(request.body or b"{}")
        assert bundle["type"] == "batch", "a transaction sent to a batch-only server"
        self.batch_sizes.append(len(bundle["entry"]))
        if self.max_entries is not None and len(bundle["entry"]) > self.max_entries:
            self.refusals.append("too-many")
            text = (f"Bundle has too many entries ({len(bundle['entry'])}): at most {self.max_entries} entries"
                    if self.stated else MEDPLUM_TOO_MANY)
            return reply(400, outcome("too-costly", text))
        answers = []
        for entry in bundle["entry"]:
            status, body = self._write(entry["request"]["method"], entry["request"]["url"], entry["resource"])
            answers.append({"response": {"status": f"{status}", "outcome": body}} if status != 201 else
                           {"response": {"status": "201 Created",
                                         "location": f"{body['resourceType']}/{body['id']}/_history/1"}})
        return reply(200, {"resourceType": "Bundle", "type": "batch-response", "entry": answers})

    def types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key in self.stored:
            counts[key.split("/")[0]] = counts.get(key.split("/")[0], 0) + 1
        return counts

    def broken_references(self) -> list[str]:
        """Stored references that do not resolve here (a conditional one, or a Type/id never stored)."""
        broken: list[str] = []

        def walk(node: Any, where: str) -> None:
            if isinstance(node, dict):
                reference = node.get("reference")
                if isinstance(reference, str) and not reference.startswith(("#", "urn:")) \
                        and reference not in self.stored and reference not in PATIENTS:
                    broken.append(f"{where} -> {reference}")
                for value in node.values():
                    walk(value, where)
            elif isinstance(node, list):
                for item in node:
                    walk(item, where)

        for key, resource in self.stored.items():
            walk(resource, key)
        return broken


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def program(tmp_path: Path) -> Program:
    return Program(tmp_path)


def unit_state(program: Program, unit_key: str) -> tuple[str | None, str]:
    with Ledger(program.ledger) as ledger:
        unit = ledger.unit(unit_key)
    return (unit.state, unit.detail or "") if unit else (None, "")


STRATEGIES = ("batch", "single")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_refused_careteam_is_parked_and_its_careplan_and_the_contacts_land(
        strategy: str, rsps: responses.RequestsMock, program: Program) -> None:
    server = FakeServer(refused={"CareTeam"})
    server.install(rsps)
    summary = program.sync(write_strategy=strategy)

    assert summary.exit_code == ExitCode.SERVER_REFUSES_TYPES
    assert (summary.counts["quarantined"], summary.counts["pending"]) == (0, 0)
    assert summary.not_permitted == {"CareTeam": 2}
    assert server.types() == {"Organization": 1, "Device": 1, "Practitioner": 1, "PractitionerRole": 1,
                              "CarePlan": 2, "Communication": 6, "Provenance": server.types()["Provenance"]}
    assert server.broken_references() == []
    careplans = [r for r in server.stored.values() if r["resourceType"] == "CarePlan"]
    assert all("careTeam" not in r or all("reference" not in ref for ref in r["careTeam"]) for r in careplans)
    state, detail = unit_state(program, "enrollment:E1")
    assert state == UnitState.NOT_PERMITTED and "sent without CareTeam" in detail
    assert unit_state(program, "contact:C1")[0] == UnitState.SENT
    # Learnt from the answers: once per enrollment at most, never again after the first refusal was read
    assert server.refusals == ["CareTeam"] * len(server.refusals) and 1 <= len(server.refusals) <= 2

    # Nothing changed: the parked CareTeams are not sent again, nothing else either.
    writes = server.writes
    again = program.sync(write_strategy=strategy)
    assert again.exit_code == ExitCode.SERVER_REFUSES_TYPES and server.writes == writes

    # The server now accepts CareTeam: the whole enrollment unit goes again, and the CarePlan refers to it.
    server.refused.clear()
    later = program.sync(write_strategy=strategy, retry_parked=True)
    assert later.exit_code == ExitCode.OK, later
    assert server.types()["CareTeam"] == 2 and server.broken_references() == []
    careplans = [r for r in server.stored.values() if r["resourceType"] == "CarePlan"]
    assert all(any(ref.get("reference", "").startswith("CareTeam/") for ref in r["careTeam"]) for r in careplans)
    assert unit_state(program, "enrollment:E1")[0] == UnitState.SENT


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_only_communication_and_provenance_writable_learnt_from_403s(
        strategy: str, rsps: responses.RequestsMock, program: Program) -> None:
    server = FakeServer(refused={"Organization", "Device", "Practitioner", "PractitionerRole", "CarePlan",
                                 "CareTeam"})
    server.install(rsps)
    summary = program.sync(write_strategy=strategy)

    assert summary.exit_code == ExitCode.SERVER_REFUSES_TYPES
    assert (summary.counts["quarantined"], summary.counts["pending"]) == (0, 0)
    assert set(summary.not_permitted) == server.refused
    assert set(server.types()) == {"Communication", "Provenance"} and server.types()["Communication"] == 6
    assert server.broken_references() == []  # references to the refused types are logical (identifier) ones
    assert unit_state(program, "enrollment:E1")[0] == UnitState.NOT_PERMITTED


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_403_for_every_type_is_an_auth_failure_outside_a_transaction_too(
        strategy: str, rsps: responses.RequestsMock, program: Program) -> None:
    server = FakeServer(refused={"Organization", "Device", "Practitioner", "PractitionerRole", "CarePlan",
                                 "CareTeam", "Communication", "Provenance"})
    server.install(rsps)
    with pytest.raises(AuthError, match="refused every write"):
        program.sync(write_strategy=strategy)
    assert not server.stored
    assert unit_state(program, "contact:C1")[0] == UnitState.PENDING  # nothing stays parked: the next run retries
    with Ledger(program.ledger) as ledger:
        assert ledger.state_counts().get(UnitState.NOT_PERMITTED, 0) == 0
        assert ledger.state_counts().get(UnitState.QUARANTINED, 0) == 0
        assert ledger.runs(1)[0]["exit_code"] == ExitCode.AUTH_FAILED


@pytest.mark.parametrize(("stated", "limit"), [(True, 3), (False, 8)])
def test_a_batch_limit_adapts_the_batch_size_instead_of_quarantining(
        stated: bool, limit: int, rsps: responses.RequestsMock, tmp_path: Path) -> None:
    program = Program(tmp_path)
    program.write(contacts=[["contact_id", "enrollment_id", "supporter_id", "contact_datetime", "mode",
                             "support_types", "notes", "void"]]
                  + [[f"C{i}", "E1", "S1", f"2026-02-{i:02d} 10:00", "telephone", "emotional", "talked", ""]
                     for i in range(1, 21)])
    server = FakeServer(max_entries=limit, stated=stated)
    server.install(rsps)
    summary = program.sync(write_strategy="batch")

    assert summary.exit_code == ExitCode.OK, summary
    assert (summary.counts["quarantined"], summary.counts["pending"]) == (0, 0)
    assert server.types()["Communication"] == 20 and server.broken_references() == []
    assert any("server limit" in a for a in summary.adaptations)
    refused_at = server.batch_sizes.index(next(s for s in server.batch_sizes if s > limit))
    assert all(s <= limit for s in server.batch_sizes[refused_at + 1:]), server.batch_sizes
    # stated: adopted after one refusal; unstated (Medplum): halved until it fits, never bisected per record
    assert server.refusals.count("too-many") == 1 if stated else server.refusals.count("too-many") <= 3


def test_a_refused_batch_entry_of_a_data_error_is_still_quarantined(rsps: responses.RequestsMock,
                                                                    program: Program) -> None:
    server = FakeServer()
    server.install(rsps)
    original: Callable[..., tuple[int, dict[str, Any]]] = server._write

    def invalid_c3(method: str, url: str, resource: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if resource.get("resourceType") == "Communication" and resource["identifier"][0]["value"].endswith("C3"):
            return 400, outcome("invalid", "Communication.status: value is not valid")
        return original(method, url, resource)

    server._write = invalid_c3  # type: ignore[method-assign]
    summary = program.sync(write_strategy="batch")
    assert summary.exit_code == ExitCode.RECORDS_REJECTED
    assert summary.counts["quarantined"] == 1 and not summary.not_permitted
    assert unit_state(program, "contact:C3")[0] == UnitState.QUARANTINED
    assert server.types()["Communication"] == 5
