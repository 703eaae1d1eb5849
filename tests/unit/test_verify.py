"""peersync verify: the comparison, the batched read-back, and repair marking in the ledger and the planner."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
from test_planner import confirm_all, contacts, plan_for

from connector.errors import ExitCode, ServerUnavailableError
from connector.ops.verify import (
    Drift,
    ReadBackError,
    compare,
    mark_for_repair,
    verify,
    verify_ledger,
)
from connector.plan.ledger import (
    DRIFTED_HASH,
    VOIDED_HASH,
    Ledger,
    SentResource,
    UnitState,
)
from connector.plan.planner import Act, units_to_write
from connector.server.client import FhirClient, RetryPolicy

BASE = "http://fhir.test/fhir"
SYSTEM = "https://example.org/sid/demo/contact"


def sent(server_id: str | None, version: str | None = "1", *, resource_type: str = "Communication",
         retracted: bool = False, value: str | None = None) -> SentResource:
    return SentResource(f"contact:{value or server_id}", resource_type, SYSTEM, value or f"v{server_id}", server_id,
                        version, retracted)


def on_server(server_id: str, version: str = "1", **elements: object) -> dict[str, object]:
    return {"resourceType": "Communication", "id": server_id, "meta": {"versionId": version}, **elements}


def client() -> FhirClient:
    return FhirClient(BASE, retry=RetryPolicy(attempts=0))


# -- compare: pure --------------------------------------------------------------------------------------------


def test_same_version_is_identical() -> None:
    assert compare(sent("1", "2"), on_server("1", "2")).drift is Drift.IDENTICAL


def test_another_version_is_changed_and_says_which() -> None:
    finding = compare(sent("1", "2"), on_server("1", "3"))
    assert (finding.drift, finding.why) == (Drift.CHANGED, "version 2 -> 3")


def test_not_found_is_missing() -> None:
    assert compare(sent("1"), None).drift is Drift.MISSING


def test_a_retracted_record_is_compared_by_its_status_not_its_version() -> None:
    # peersync's own void bumped the version after the ledger stored it: only the status tells
    assert compare(sent("1", "1", retracted=True), on_server("1", "2", status="entered-in-error")).drift \
        is Drift.IDENTICAL
    finding = compare(sent("1", "1", retracted=True), on_server("1", "3", status="completed"))
    assert (finding.drift, finding.why) == (Drift.CHANGED, "status completed")


# -- verify: batched searches ------------------------------------------------------------------------------------


def searchset(*resources: dict[str, object], next_url: str | None = None) -> dict[str, object]:
    bundle: dict[str, object] = {"resourceType": "Bundle", "type": "searchset",
                                 "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


@responses.activate
def test_resources_are_read_back_in_batches_by_id_with_only_the_elements_needed() -> None:
    expected = [sent(str(i)) for i in range(1, 6)]
    seen: list[dict[str, list[str]]] = []

    def answer(request: object) -> tuple[int, dict[str, str], str]:
        import json

        query = parse_qs(urlsplit(request.url).query)  # type: ignore[attr-defined]
        seen.append(query)
        ids = query["_id"][0].split(",")
        found = [on_server(i, "2" if i == "3" else "1", status="completed") for i in ids if i != "4"]
        return 200, {}, json.dumps(searchset(*found))

    responses.add_callback(responses.GET, f"{BASE}/Communication", callback=answer)
    report = verify(client(), expected, batch_size=2)
    assert len(seen) == 3  # 5 ids in batches of 2: never one request per resource
    assert all(q["_elements"] == ["status"] for q in seen)
    assert report.totals() == {"identical": 3, "changed": 1, "missing": 1}
    assert report.by_type["Communication"]["changed"] == 1
    assert report.drifted_units() == ["contact:3", "contact:4"]
    assert report.exit_code() == 65 and report.requests == 3


@responses.activate
def test_every_page_is_read_when_the_server_caps_the_page_size() -> None:
    responses.get(f"{BASE}/Communication", json=searchset(on_server("1"), next_url=f"{BASE}?_getpages=x&p=2"))
    responses.get(f"{BASE}", json=searchset(on_server("2")))
    report = verify(client(), [sent("1"), sent("2")])
    assert report.totals() == {"identical": 2, "changed": 0, "missing": 0}
    assert report.exit_code() == int(ExitCode.OK)


@responses.activate
def test_a_resource_without_a_server_id_is_found_by_its_identifier() -> None:
    found = on_server("9") | {"identifier": [{"system": SYSTEM, "value": "a,b"}]}
    responses.get(f"{BASE}/Communication", json=searchset(found))
    report = verify(client(), [sent(None, None, value="a,b"), sent(None, None, value="gone")])
    query = parse_qs(urlsplit(responses.calls[0].request.url).query)
    assert query["identifier"] == [f"{SYSTEM}|a\\,b,{SYSTEM}|gone"]  # FHIR token escaping of the comma
    assert report.totals() == {"identical": 1, "changed": 0, "missing": 1}


@responses.activate
def test_a_refused_search_names_what_verify_needs() -> None:
    responses.get(f"{BASE}/Communication", status=400, json={"resourceType": "OperationOutcome", "issue": []})
    with pytest.raises(ReadBackError, match="_id and identifier"):
        verify(client(), [sent("1")])


@responses.activate
def test_an_unavailable_server_is_exit_69() -> None:
    responses.get(f"{BASE}/Communication", status=503)
    with pytest.raises(ServerUnavailableError):
        verify(client(), [sent("1")])


# -- repair: the ledger marks exactly the drifted units; the planner re-sends exactly those ----------------------


@pytest.fixture()
def ledger(tmp_path: Path) -> Ledger:
    with Ledger(tmp_path / "ledger.sqlite") as led:
        yield led


def confirm(ledger: Ledger, key: str, server_id: str, *, unit_hash: str = "h") -> None:
    ledger.record_confirmed(key, kind="contact", participant="E1", unit_hash=unit_hash, voided=False,
                            patient_id="p", resources=[("Communication", SYSTEM, key, server_id, "1")],
                            detail="201", run_id="r")


def test_sent_resources_lists_only_confirmed_units_and_flags_retracted_ones(ledger: Ledger) -> None:
    confirm(ledger, "contact:C1", "11")
    confirm(ledger, "contact:C2", "12")
    ledger.record_state("contact:C3", kind="contact", participant="E1", state=UnitState.PENDING, detail="",
                        run_id="r")
    ledger.record_voided("contact:C2", run_id="r")
    resources = {r.unit_key: r for r in ledger.sent_resources()}
    assert set(resources) == {"contact:C1", "contact:C2"}
    assert resources["contact:C2"].retracted and not resources["contact:C1"].retracted
    assert len(ledger.sent_resources(sample=1)) == 1


@responses.activate
def test_repair_marks_drifted_units_and_forgets_missing_server_ids(ledger: Ledger) -> None:
    confirm(ledger, "contact:C1", "11")
    confirm(ledger, "contact:C2", "12")
    confirm(ledger, "contact:C3", "13")
    responses.get(f"{BASE}/Communication", json=searchset(on_server("11"), on_server("12", "4")))
    report = verify_ledger(client(), ledger)
    assert mark_for_repair(ledger, report, run_id="r2") == 2
    assert ledger.unit("contact:C1").state == UnitState.SENT  # identical: untouched
    for key in ("contact:C2", "contact:C3"):
        unit = ledger.unit(key)
        assert (unit.state, unit.hash) == (UnitState.PENDING, DRIFTED_HASH)
    assert [r.server_id for r in ledger.resources_of("contact:C2")] == ["12"]  # changed: same resource, updated
    assert ledger.resources_of("contact:C3") == []  # missing: found again by identifier, references conditional


@responses.activate
def test_a_missing_contact_also_resends_the_careplan_that_links_it(ledger: Ledger) -> None:
    confirm(ledger, "contact:C1", "11")
    confirm(ledger, "contact:C2", "12")
    ledger.record_confirmed("enrollment:E1", kind="enrollment", participant="E1", unit_hash="h", voided=False,
                            patient_id="p", resources=[], detail="200", run_id="r")
    responses.get(f"{BASE}/Communication", json=searchset(on_server("11")))  # C2 deleted on the server
    report = verify_ledger(client(), ledger)
    assert mark_for_repair(ledger, report, run_id="r2") == 2  # C2, and E1's CarePlan whose outcome link it was
    assert ledger.unit("enrollment:E1").hash == DRIFTED_HASH
    assert ledger.unit("contact:C1").state == UnitState.SENT


@responses.activate
def test_a_changed_contact_leaves_the_careplan_alone(ledger: Ledger) -> None:
    confirm(ledger, "contact:C1", "11")
    ledger.record_confirmed("enrollment:E1", kind="enrollment", participant="E1", unit_hash="h", voided=False,
                            patient_id="p", resources=[], detail="200", run_id="r")
    responses.get(f"{BASE}/Communication", json=searchset(on_server("11", "4")))  # edited, same server id
    report = verify_ledger(client(), ledger)
    assert mark_for_repair(ledger, report, run_id="r2") == 1
    assert ledger.unit("enrollment:E1").hash == "h"


def test_the_planner_resends_exactly_the_drifted_units(tmp_path: Path, ledger: Ledger) -> None:
    staging, _ = plan_for(tmp_path, ledger, contacts(6))
    confirm_all(staging, ledger)
    staging.close()
    ledger.mark_drifted(["contact:C2", "contact:C5"], [], detail="drift", run_id="r2")
    staging, _ = plan_for(tmp_path, ledger, contacts(6))
    writes = {key: action for p in (None, "E1", "E2") for key, _k, _s, _h, action in units_to_write(staging, p)}
    assert writes == {"contact:C2": Act.UPDATE.value, "contact:C5": Act.UPDATE.value}


def test_a_retracted_unit_that_drifted_is_voided_again(tmp_path: Path, ledger: Ledger) -> None:
    staging, _ = plan_for(tmp_path, ledger, contacts(6))
    confirm_all(staging, ledger)
    staging.close()
    ledger.record_voided("contact:C6", run_id="r")  # gone from the source, voided on the server
    assert ledger.unit("contact:C6").hash == VOIDED_HASH
    ledger.mark_drifted(["contact:C6"], [], detail="drift", run_id="r2")  # someone un-voided it on the server
    staging, _ = plan_for(tmp_path, ledger, contacts(5))
    writes = {key: action for p in (None, "E1", "E2") for key, _k, _s, _h, action in units_to_write(staging, p)}
    # C6 is voided again; E2's CarePlan no longer lists it as an outcome
    assert writes == {"contact:C6": Act.DELETE.value, "enrollment:E2": Act.UPDATE.value}
