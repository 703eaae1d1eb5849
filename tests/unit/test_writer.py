"""The writer's paths over `responses`: per test, the requests the writer is expected to make, each answered with
a canned, HAPI-like answer (tests/unit/fhir_answers.py). What lands, what is split, deferred, quarantined,
voided, moved or left pending: asserted on what the writer sent, on the ledger and on the counts."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import requests
import responses
from requests import PreparedRequest
from responses import matchers

from connector.errors import ExitCode, ServerUnavailableError
from connector.map import MappingContext
from connector.plan.ledger import Ledger, UnitState
from connector.read.profile import load_profile
from connector.run import RunSummary, Syncer, SyncOptions
from connector.server.client import FhirClient, FhirHttpError, RetryPolicy
from tests.unit.fhir_answers import (
    BASE,
    Bundle,
    Refusal,
    answer_transactions,
    as_stored,
    capability_statement,
    landed,
    outcome,
    patient,
    reply,
    searchset,
    sent_transactions,
    transaction_response,
)

PROFILE = load_profile("peersync-template")
CTX = MappingContext.from_profile(PROFILE)
FAST = RetryPolicy(attempts=0, backoff_factor=0.0, backoff_max=0.0, jitter=0.0, retry_after_cap=0.0)
CLOCK = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
FHIR_JSON = "application/fhir+json"

SUPPORTERS = [["staff_id", "given_name", "family_name", "title"], ["S1", "Ana", "Lopez", "promotora"]]
CONTACT_HEADER = ["contact_id", "enrollment_id", "supporter_id", "contact_datetime", "mode", "support_types", "notes",
                  "void"]


def enrollments(mrns: dict[str, str]) -> list[list[str]]:
    rows = [["enrollment_id", "mrn", "start_date", "status", "supporter_id"]]
    return rows + [[e, mrn, "2026-01-05", "active", "S1"] for e, mrn in mrns.items()]


def contacts(ids: list[int], *, note: str = "talked") -> list[list[str]]:
    return [CONTACT_HEADER] + [[f"C{i}", "E1" if i % 2 else "E2", "S1", f"2026-02-{i:02d} 10:00", "telephone",
                                "emotional", note, ""] for i in ids]


class Program:
    """A small program on disk and the syncs of it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inputs = root / "in"
        self.inputs.mkdir(parents=True, exist_ok=True)
        self.ledger = root / "ledger.sqlite"
        self.write(contacts=contacts([1, 2, 3, 4, 5, 6]))

    def write(self, *, contacts: list[list[str]], mrns: dict[str, str] | None = None) -> None:
        for name, rows in (("supporters.csv", SUPPORTERS), ("enrollments.csv", enrollments(mrns or {"E1": "MRN1",
                                                                                                    "E2": "MRN2"})),
                           ("contacts.csv", contacts)):
            with (self.inputs / name).open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows(rows)

    def options(self, **overrides: Any) -> SyncOptions:
        values: dict[str, Any] = {"concurrency": 1, "max_bundle_entries": 100, "write_mode": "auto"}
        values.update(overrides)
        return SyncOptions(profile=PROFILE, inputs=[self.inputs], ledger_path=self.ledger, ctx=CTX,
                           rejects_dir=self.root / "rejects", **values)

    def sync(self, **overrides: Any) -> RunSummary:
        syncer = Syncer(self.options(**overrides), FhirClient(BASE, retry=FAST), clock=lambda: CLOCK)
        try:
            return syncer.run("run")
        except Exception:
            assert syncer.summary is not None
            raise

    def unit_state(self, unit_key: str) -> str | None:
        with Ledger(self.ledger) as ledger:
            unit = ledger.unit(unit_key)
        return unit.state if unit else None


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    # Every registered answer must be asked for: a test registers exactly the requests it expects.
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture
def program(tmp_path: Path) -> Program:
    return Program(tmp_path)


# -- canned answers for these tests -------------------------------------------------------------------------------


def answer_metadata(rsps: responses.RequestsMock, **switches: bool) -> None:
    rsps.add(responses.GET, f"{BASE}/metadata", body=json.dumps(capability_statement(**switches)),
             content_type=FHIR_JSON)


def answer_patient_search(rsps: responses.RequestsMock, mrn: str, patient_id: str | None) -> None:
    """The Patient search by one MRN: one match, or (patient_id None) an empty searchset."""
    found = [patient(patient_id, CTX.mrn_system, mrn)] if patient_id else []
    rsps.add(responses.GET, f"{BASE}/Patient", body=json.dumps(searchset(found)), content_type=FHIR_JSON,
             match=[matchers.query_param_matcher({"identifier": f"{CTX.mrn_system}|{mrn}"})])


def answer_first_sync(rsps: responses.RequestsMock, **switches: bool) -> None:
    """A server that knows MRN1 (p1) and MRN2 (p2) and takes every transaction."""
    answer_metadata(rsps, **switches)
    answer_patient_search(rsps, "MRN1", "p1")
    answer_patient_search(rsps, "MRN2", "p2")
    rsps.add_callback(responses.POST, f"{BASE}/", callback=answer_transactions())


def refusing(rsps: responses.RequestsMock, refuse: Any) -> None:
    """From now on transactions are answered by ``answer_transactions(refuse)``."""
    rsps.remove(responses.POST, f"{BASE}/")
    rsps.add_callback(responses.POST, f"{BASE}/", callback=answer_transactions(refuse))


def requests_made(rsps: responses.RequestsMock, since: int = 0) -> list[str]:
    """'METHOD path?query' of every request from call number ``since`` on, the base stripped."""
    return [f"{c.request.method} {c.request.url.removeprefix(BASE)}" for c in list(rsps.calls)[since:]]


def communications_with(bundle: Bundle, contact_id: str) -> bool:
    return any(e["resource"]["resourceType"] == "Communication"
               and e["resource"]["identifier"][0]["value"].endswith(contact_id) for e in bundle["entry"])


def contacts_in(bundle: Bundle) -> list[str]:
    return sorted(e["resource"]["identifier"][0]["value"].rsplit(":", 1)[-1].rsplit("/", 1)[-1]
                  for e in bundle["entry"] if e["resource"]["resourceType"] == "Communication")


def resources_on_server(rsps: responses.RequestsMock) -> dict[str, dict[str, Any]]:
    """'Type/id' -> the resource as a read returns it, for every resource a transaction-response confirmed."""
    stored = {}
    for request_entry, response_entry in landed(rsps):
        resource_type, resource_id, _history, version = response_entry["response"]["location"].split("/")
        stored[f"{resource_type}/{resource_id}"] = as_stored(request_entry["resource"], resource_id, int(version))
    return stored


def location_of(rsps: responses.RequestsMock, resource_type: str, contact_id: str) -> str:
    (location,) = {a["response"]["location"].rsplit("/_history", 1)[0] for e, a in landed(rsps)
                   if e["resource"]["resourceType"] == resource_type
                   and e["resource"]["identifier"][0]["value"].endswith(contact_id)}
    return location


# -- first syncs, bisection, deferral ------------------------------------------------------------------------------


def change_sets_in(bundle: Bundle) -> list[Bundle]:
    """A transaction's change-sets, in order: each is its resources, then its Provenances."""
    out: list[Bundle] = []
    for entry in bundle["entry"]:
        is_provenance = entry["resource"]["resourceType"] == "Provenance"
        if not out or (not is_provenance and out[-1]["entry"][-1]["resource"]["resourceType"] == "Provenance"):
            out.append({"resourceType": "Bundle", "type": "transaction", "entry": []})
        out[-1]["entry"].append(entry)
    return out


def test_a_first_sync_creates_one_change_set_per_participant_small_ones_sharing_a_transaction(
        rsps: responses.RequestsMock, program: Program) -> None:
    answer_first_sync(rsps)
    summary = program.sync()
    assert (summary.exit_code, summary.outcome) == (0, "ok")
    assert summary.counts["created"] == 1 + 1 + 2 + 6  # program, supporter, 2 enrollments, 6 contacts
    mrn = CTX.mrn_system.replace(":", "%3A")
    assert requests_made(rsps) == ["GET /metadata", "POST /",  # program-wide: program and supporter
                                   f"GET /Patient?identifier={mrn}%7CMRN1",
                                   f"GET /Patient?identifier={mrn}%7CMRN2", "POST /"]  # E1's and E2's, shared
    program_wide, shared = sent_transactions(rsps)
    e1, e2 = change_sets_in(shared)
    assert shared["type"] == "transaction" and shared["entry"] == e1["entry"] + e2["entry"]
    assert (contacts_in(e1), contacts_in(e2)) == (["C1", "C3", "C5"], ["C2", "C4", "C6"])
    for bundle in (program_wide, e1, e2):
        assert bundle["type"] == "transaction"
        writes, provenances = not_provenances(bundle), provenances_in(bundle)
        assert bundle["entry"] == writes + provenances  # the Provenances (one per author) come last
        assert all(e["request"]["method"] == "PUT" and "?identifier=" in e["request"]["url"] for e in writes)
        assert provenances and all(p["request"]["method"] == "POST" and p["request"]["ifNoneExist"].startswith(
            "_tag=") for p in provenances)
    assert {e["resource"]["subject"]["reference"] for e in e1["entry"]
            if e["resource"]["resourceType"] == "Communication"} == {"Patient/p1"}
    with Ledger(program.ledger) as ledger:
        assert program.unit_state("contact:C1") == UnitState.SENT
        (communication,) = ledger.resources_of("contact:C1")
    assert f"Communication/{communication.server_id}" == location_of(rsps, "Communication", "C1")

    calls = len(rsps.calls)
    assert program.sync().counts["unchanged"] == 10
    assert requests_made(rsps, calls) == []  # nothing to send, nothing asked


def test_a_rejected_unit_is_isolated_by_bisection_and_the_rest_lands(rsps: responses.RequestsMock,
                                                                     program: Program) -> None:
    answer_first_sync(rsps)
    refusing(rsps, lambda bundle: (422, outcome("processing", "HAPI-0450: Failed to parse request body"))
             if communications_with(bundle, "C3") else None)
    summary = program.sync()
    assert (summary.exit_code, summary.outcome) == (int(ExitCode.RECORDS_REJECTED), "partial")
    assert summary.counts["quarantined"] == 1 and summary.counts["created"] == 9
    assert program.unit_state("contact:C3") == UnitState.QUARANTINED
    assert program.unit_state("contact:C1") == UnitState.SENT
    # E1's units: the enrollment (CarePlan, CareTeam), C1, C3, C5. Split into [enrollment, C1] and [C3, C5], then
    # [C3] and [C5]: resources per transaction, the Provenance aside. The CarePlan landed without the outcome links
    # to C3 and C5 (not written yet): it goes once more at the end, linking C5 (C3 never landed).
    e1 = [b for b in sent_transactions(rsps) if not communications_with(b, "C2")
          and (contacts_in(b) or b["entry"][0]["resource"]["resourceType"] == "CarePlan")]
    assert [len(not_provenances(b)) for b in e1] == [5, 3, 2, 1, 1, 2]
    assert [contacts_in(b) for b in e1] == [["C1", "C3", "C5"], ["C1"], ["C3", "C5"], ["C3"], ["C5"], []]
    careplan = e1[-1]["entry"][0]["resource"]
    assert [ref["reference"] for a in careplan["activity"] for ref in a.get("outcomeReference", ())] == [
        location_of(rsps, "Communication", c) for c in ("C1", "C5")]
    with Ledger(program.ledger) as ledger:
        c3 = ledger.unit("contact:C3")
    assert c3 is not None and "HAPI-0450" in (c3.detail or "")


def test_a_resync_sends_the_small_change_sets_of_several_participants_in_one_transaction(
        rsps: responses.RequestsMock, program: Program) -> None:
    answer_first_sync(rsps)
    program.sync()
    program.write(contacts=[*contacts([1, 2, 3, 4, 5, 6]), *contacts([7, 8])[1:]])  # new: C7 (E1), C8 (E2)
    calls = len(rsps.calls)
    summary = program.sync()
    # the two contacts, and the two CarePlans that now link them as outcomes (MCC eCare Plan)
    assert summary.exit_code == 0 and summary.counts["created"] == 4
    (shared,) = sent_transactions(rsps)[2:]  # one request for both participants
    assert len([r for r in requests_made(rsps, calls) if r.startswith("POST")]) == 1
    e1, e2 = change_sets_in(shared)
    assert (contacts_in(e1), contacts_in(e2)) == (["C7"], ["C8"])
    # each change-set keeps its own Provenances (one per author), conditional creates on its own change-set tag
    tags1 = {p["request"]["ifNoneExist"] for p in provenances_in(e1)}
    tags2 = {p["request"]["ifNoneExist"] for p in provenances_in(e2)}
    assert tags1 and tags2 and not tags1 & tags2
    targets1 = {t["reference"] for p in provenances_in(e1) for t in p["resource"]["target"]}
    assert targets1 == {e["fullUrl"] for e in not_provenances(e1)}

    calls = len(rsps.calls)
    again = program.sync()
    assert again.exit_code == 0 and not [r for r in requests_made(rsps, calls) if r.startswith("POST")]


def test_a_shared_transaction_that_times_out_is_sent_alone_and_sharing_stops_for_the_run(
        rsps: responses.RequestsMock, program: Program) -> None:
    """A slow link may time out on the larger shared request where each change-set alone gets through: a run
    that tried sharing again and again would never converge (the Toxiproxy slicer scenario)."""
    answer_first_sync(rsps)
    program.sync()
    program.write(contacts=[*contacts([1, 2, 3, 4, 5, 6]), *contacts([7, 8])[1:]])

    def time_out_when_shared(bundle: Bundle) -> None:
        if communications_with(bundle, "C7") and communications_with(bundle, "C8"):
            raise requests.ConnectionError("read timed out")

    refusing(rsps, time_out_when_shared)
    calls = len(rsps.calls)
    summary = program.sync()
    assert summary.exit_code == 0 and summary.counts["pending"] == 0
    assert program.unit_state("contact:C7") == program.unit_state("contact:C8") == UnitState.SENT
    assert [r for r in requests_made(rsps, calls) if r.startswith("POST")] == ["POST /"] * 3  # shared, then alone


def test_a_refused_shared_transaction_quarantines_only_the_participant_at_fault(rsps: responses.RequestsMock,
                                                                               program: Program) -> None:
    answer_first_sync(rsps)
    program.sync()
    program.write(contacts=[*contacts([1, 2, 3, 4, 5, 6]), *contacts([7, 8])[1:]])
    refusing(rsps, lambda bundle: (422, outcome("processing", "HAPI-0450: Failed to parse request body"))
             if communications_with(bundle, "C7") else None)
    calls = len(rsps.calls)
    summary = program.sync()
    assert (summary.exit_code, summary.outcome) == (int(ExitCode.RECORDS_REJECTED), "partial")
    # C8 and E2's CarePlan land; E1's CarePlan too, without its outcome link to C7 (resent next run)
    assert summary.counts["quarantined"] == 1 and summary.counts["created"] == 3
    assert program.unit_state("contact:C7") == UnitState.QUARANTINED
    assert program.unit_state("contact:C8") == UnitState.SENT
    # the shared request, then each participant's change-set alone: E1's refused again and split (its CarePlan
    # lands, C7 is quarantined, the CarePlan is sent once more without its outcome link to C7), then E2's
    assert [[contacts_in(c) for c in change_sets_in(b)] for b in sent_transactions(rsps)[2:]] == [
        [["C7"], ["C8"]], [["C7"]], [[]], [["C7"]], [[]], [["C8"]]]
    assert [r for r in requests_made(rsps, calls) if r.startswith("POST")] == ["POST /"] * 6


def test_a_unit_failing_only_on_an_unresolved_reference_is_deferred_then_lands(rsps: responses.RequestsMock,
                                                                               program: Program) -> None:
    answer_metadata(rsps)
    answer_patient_search(rsps, "MRN1", "p1")
    answer_patient_search(rsps, "MRN2", "p2")
    # The first transaction carrying C5 is refused: responses answers a request matching two registrations with
    # the first one and drops it, so the next C5 transaction gets the general answer.
    rsps.add(responses.POST, f"{BASE}/", status=400, content_type=FHIR_JSON, body=json.dumps(outcome(
        "processing", "HAPI-1091: Invalid match URL \"CarePlan?identifier=x\" - No resources match this search")),
        match=[lambda request: (communications_with(json.loads(request.body), "C5"), "carries C5")])
    rsps.add_callback(responses.POST, f"{BASE}/", callback=answer_transactions())
    summary = program.sync(max_bundle_entries=1)  # every unit in its own transaction
    assert (summary.exit_code, summary.counts["quarantined"]) == (0, 0)
    assert program.unit_state("contact:C5") == UnitState.SENT
    sent = sent_transactions(rsps)
    c5 = [i for i, b in enumerate(sent) if communications_with(b, "C5")]
    e1_units = [i for i, b in enumerate(sent) if communications_with(b, "C1") or communications_with(b, "C3")]
    e2_units = [i for i, b in enumerate(sent) if communications_with(b, "C2")]
    assert len(c5) == 2 and max(e1_units) < c5[1] < min(e2_units)  # again after E1's other units, before E2


def test_an_unresolved_reference_in_the_deferred_pass_is_quarantined(rsps: responses.RequestsMock,
                                                                     program: Program) -> None:
    answer_first_sync(rsps)
    refusing(rsps, lambda bundle: (400, outcome("processing", "HAPI-1094: Resource Goal/x not found, specified in "
                                                "path: Communication.basedOn")) if communications_with(bundle, "C5")
             else None)
    answer_reads(rsps, 200)  # the referenced resources the ledger knows are on the server: the content is at fault
    summary = program.sync(max_bundle_entries=1)
    assert summary.counts["quarantined"] == 1
    assert len([b for b in sent_transactions(rsps) if communications_with(b, "C5")]) == 2  # sent, deferred
    assert program.unit_state("contact:C5") == UnitState.QUARANTINED


def answer_reads(rsps: responses.RequestsMock, status: int) -> None:
    """Reads by id (Type/id) answered with ``status``: 200 with the resource, or 404."""
    def read(request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        resource_type, resource_id = (request.path_url or "").split("?")[0].rsplit("/", 2)[-2:]
        found = {"resourceType": resource_type, "id": resource_id}
        body = found if status == 200 else outcome("not-found", "HAPI-2001")
        return status, {"Content-Type": FHIR_JSON}, json.dumps(body)
    rsps.add_callback(responses.GET, re.compile(re.escape(BASE) + r"/[A-Z][A-Za-z]+/[^/?]+$"), callback=read)


def test_a_reference_target_the_server_lost_is_re_sent_not_quarantined(rsps: responses.RequestsMock,
                                                                        program: Program) -> None:
    # The ledger says the CarePlan was written, but the server no longer has it (restored, refreshed): server
    # state, not bad data. Its unit is marked for re-send and the referrer waits for it (pending, not quarantined).
    answer_first_sync(rsps)
    refusing(rsps, lambda bundle: (404, outcome("processing", "HAPI-1094: Resource CarePlan/x not found, specified "
                                                "in path: Communication.basedOn")) if communications_with(bundle, "C5")
             else None)
    answer_reads(rsps, 404)
    summary = program.sync(max_bundle_entries=1)
    # C5, and E1's CarePlan that lists C5 among its outcomes (landed without that link, completed next run)
    assert summary.counts["quarantined"] == 0 and summary.counts["pending"] == 2
    assert program.unit_state("contact:C5") == UnitState.PENDING
    with Ledger(program.root / "ledger.sqlite") as ledger:
        marked = [u for u in ledger.units_in_state(UnitState.PENDING) if u.unit_key != "contact:C5"]
    # every target it referenced by a ledger id reads 404 here: the program's, its supporter's, its CarePlan's
    assert {u.kind for u in marked} == {"program", "supporter", "enrollment"}
    # the CarePlan was then written without its outcome link to C5: pending too, with no confirmed hash
    assert {u.hash for u in marked if u.kind != "enrollment"} == {"drifted"}
    assert {u.hash for u in marked if u.kind == "enrollment"} <= {"drifted", None}
    assert any("lost by the server" in reason for reason in summary.pending_reasons)


# -- refusals, review, outages -------------------------------------------------------------------------------------


def test_a_server_that_cannot_take_transactions_ends_the_run(rsps: responses.RequestsMock,
                                                             program: Program) -> None:
    answer_metadata(rsps)
    rsps.add(responses.POST, f"{BASE}/", status=405, content_type=FHIR_JSON,
             body=json.dumps(outcome("not-supported", "HAPI-0389: Transaction processing is disabled")))
    with pytest.raises(FhirHttpError) as raised:
        program.sync()
    assert raised.value.status == 405
    assert requests_made(rsps) == ["GET /metadata", "POST /"]  # no participant is tried after a fatal refusal
    assert program.unit_state("program:" + CTX.program_id) == UnitState.QUARANTINED


def test_a_participant_without_a_patient_goes_to_review(rsps: responses.RequestsMock, program: Program) -> None:
    answer_metadata(rsps)
    answer_patient_search(rsps, "MRN1", "p1")
    answer_patient_search(rsps, "MRN2", None)
    rsps.add_callback(responses.POST, f"{BASE}/", callback=answer_transactions())
    summary = program.sync()
    assert (summary.exit_code, summary.counts["in_review"]) == (int(ExitCode.RECORDS_REJECTED), 4)  # E2 + 3 contacts
    assert program.unit_state("contact:C2") == UnitState.REVIEW
    with Ledger(program.ledger) as ledger:
        assert [r["reason"] for r in ledger.reviews()] == ["patient-not-found"]
    assert len(sent_transactions(rsps)) == 2  # program-wide and E1; nothing of E2
    assert not any(communications_with(b, "C2") for b in sent_transactions(rsps))


def test_a_server_that_goes_down_leaves_the_rest_pending(rsps: responses.RequestsMock, program: Program) -> None:
    answer_metadata(rsps)
    answer_patient_search(rsps, "MRN1", "p1")
    # MRN2 is looked up twice: first while the server is down (503), then in the next run.
    rsps.add(responses.GET, f"{BASE}/Patient", status=503, content_type=FHIR_JSON,
             body=json.dumps(outcome("transient", "Service Unavailable")),
             match=[matchers.query_param_matcher({"identifier": f"{CTX.mrn_system}|MRN2"})])
    answer_patient_search(rsps, "MRN2", "p2")
    rsps.add_callback(responses.POST, f"{BASE}/", callback=answer_transactions())
    with pytest.raises(ServerUnavailableError):
        program.sync()
    # E1's small change-set waited to share a request; once the server is down it is not sent either
    assert program.unit_state("contact:C1") == program.unit_state("contact:C2") == UnitState.PENDING
    with Ledger(program.ledger) as ledger:
        (run,) = ledger.runs()
    assert run["exit_code"] == int(ExitCode.SERVER_UNAVAILABLE)
    assert len(sent_transactions(rsps)) == 1  # program-wide

    summary = program.sync()
    assert summary.exit_code == 0 and summary.counts["retried"] == 8  # E1, C1, C3, C5, E2, C2, C4, C6
    assert [contacts_in(c) for c in change_sets_in(sent_transactions(rsps)[-1])] == [["C1", "C3", "C5"],
                                                                                     ["C2", "C4", "C6"]]


# -- corrections: voids and moves ----------------------------------------------------------------------------------


def provenances_in(bundle: Bundle) -> list[dict[str, Any]]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Provenance"]


def not_provenances(bundle: Bundle) -> list[dict[str, Any]]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Provenance"]


def is_void(bundle: Bundle) -> bool:
    return any(e["request"]["url"].startswith("Communication/") for e in bundle["entry"])


def test_a_record_gone_from_the_input_is_voided_with_one_provenance_even_when_the_answer_is_lost(
        rsps: responses.RequestsMock, program: Program) -> None:
    answer_first_sync(rsps)
    program.sync()
    c1 = location_of(rsps, "Communication", "C5")
    as_written = resources_on_server(rsps)[c1]
    # C5 removed (1 of 6: under max_delete_fraction); not S1's first contact with E1, so E1's CareTeam stays as it is
    program.write(contacts=contacts([1, 2, 3, 4, 6]))
    # The void reads C5 twice: before the void, and in the next run after the server committed it.
    rsps.add(responses.GET, f"{BASE}/{c1}", body=json.dumps(as_written), content_type=FHIR_JSON)
    rsps.add(responses.GET, f"{BASE}/{c1}", content_type=FHIR_JSON,
             body=json.dumps(as_stored({**as_written, "status": "entered-in-error"}, c1.split("/")[1], 2)))
    lost: list[Bundle] = []

    def commit_then_lose_the_answer(bundle: Bundle) -> Refusal | None:
        if is_void(bundle) and not lost:
            lost.append(bundle)
            return 502, outcome("transient", "Bad Gateway")  # the server committed; the answer never arrives
        return None

    calls = len(rsps.calls)
    refusing(rsps, commit_then_lose_the_answer)
    with pytest.raises(ServerUnavailableError):
        program.sync()
    made = requests_made(rsps, calls)
    # the CarePlan that listed C5 among its outcomes is updated first (found the Patient, sent), then C5 is voided
    assert made[0] == "GET /metadata" and made[-2:] == [f"GET /{c1}", "POST /"] and len(made) == 5
    assert program.unit_state("contact:C5") == UnitState.PENDING

    summary = program.sync()  # the void is sent again, with the same Provenance condition
    assert summary.counts["deleted"] == 1 and summary.exit_code == 0
    first, again = [b for b in sent_transactions(rsps) if is_void(b)]
    assert first == again  # the same change-set, the same condition: the server keeps one Provenance
    voided, provenance = first["entry"]
    assert (voided["request"], voided["resource"]["status"]) == ({"method": "PUT", "url": c1}, "entered-in-error")
    assert "meta" not in voided["resource"]
    tag = provenance["resource"]["meta"]["tag"][0]
    assert (provenance["request"]["method"], provenance["request"]["url"]) == ("POST", "Provenance")
    assert unquote(provenance["request"]["ifNoneExist"]) == f"_tag={tag['system']}|{tag['code']}"
    assert provenance["resource"]["activity"]["coding"][0]["code"] == "NULLIFY"
    assert provenance["resource"]["target"] == [{"reference": c1}]
    assert program.unit_state("contact:C5") == UnitState.SENT
    with Ledger(program.ledger) as ledger:
        assert ledger.unit("contact:C5").voided  # type: ignore[union-attr]


def test_a_void_the_server_refuses_is_quarantined(rsps: responses.RequestsMock, program: Program) -> None:
    answer_first_sync(rsps)
    program.sync()
    c1 = location_of(rsps, "Communication", "C1")
    rsps.add(responses.GET, f"{BASE}/{c1}", body=json.dumps(resources_on_server(rsps)[c1]), content_type=FHIR_JSON)
    program.write(contacts=contacts([2, 3, 4, 5, 6]))
    refusing(rsps, lambda bundle: (422, outcome("processing", "HAPI-0450: Failed to parse request body"))
             if is_void(bundle) else None)
    summary = program.sync()
    assert summary.counts["quarantined"] == 1 and program.unit_state("contact:C1") == UnitState.QUARANTINED
    with Ledger(program.ledger) as ledger:
        unit = ledger.unit("contact:C1")
    assert unit is not None and not unit.voided and "void failed: HTTP 422" in (unit.detail or "")


def test_a_record_moved_to_another_patient_retires_the_old_resources(rsps: responses.RequestsMock,
                                                                     program: Program) -> None:
    answer_first_sync(rsps)
    program.sync()
    on_server = resources_on_server(rsps)
    e1_resources = {path: r for path, r in on_server.items()
                    if r.get("subject", r.get("patient", {})).get("reference") == "Patient/p1"}
    program.write(contacts=contacts([1, 2, 3, 4, 5, 6]), mrns={"E1": "MRN9", "E2": "MRN2"})
    answer_patient_search(rsps, "MRN9", "p9")
    for path, resource in e1_resources.items():  # each old resource is read, then updated by id
        rsps.add(responses.GET, f"{BASE}/{path}", body=json.dumps(resource), content_type=FHIR_JSON)

    def updated(request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        body = json.loads(request.body or b"{}")
        return reply(200, as_stored(body, body["id"], 2))

    rsps.add_callback(responses.PUT, re.compile(rf"{re.escape(BASE)}/\w+/\d+$"), callback=updated)
    calls = len(rsps.calls)
    summary = program.sync()
    assert summary.exit_code == 0

    puts = {c.request.url.removeprefix(f"{BASE}/"): json.loads(c.request.body) for c in list(rsps.calls)[calls:]
            if c.request.method == "PUT"}
    assert set(puts) == set(e1_resources) and len(puts) >= 5  # CarePlan, CareTeam, C1, C3, C5 at least
    old_c1 = puts[location_of(rsps, "Communication", "C1")]
    assert (old_c1["subject"]["reference"], old_c1["status"]) == ("Patient/p1", "entered-in-error")
    assert "retired" in old_c1["identifier"][0]["system"] and "meta" not in old_c1
    (moved,) = sent_transactions(rsps)[2:]  # the first sync: program-wide, then E1 and E2 in one shared
    new_c1 = next(e for e in moved["entry"] if communications_with({"entry": [e]}, "C1"))
    assert new_c1["resource"]["subject"]["reference"] == "Patient/p9"
    assert new_c1["request"]["url"].startswith("Communication?identifier=")
    assert "retired" not in new_c1["request"]["url"]
    with Ledger(program.ledger) as ledger:
        assert ledger.unit("contact:C1").patient_id == "p9"  # type: ignore[union-attr]


def test_a_moved_record_whose_old_resources_the_server_lost_is_written_afresh(rsps: responses.RequestsMock,
                                                                               program: Program) -> None:
    """After a restore or a refreshed test EHR the Patient has a new id and our old resources are gone: the
    retirement finds nothing to retire (404) instead of leaving the participant pending for ever."""
    answer_first_sync(rsps)
    program.sync()
    program.write(contacts=contacts([1, 2, 3, 4, 5, 6]), mrns={"E1": "MRN9", "E2": "MRN2"})
    answer_patient_search(rsps, "MRN9", "p9")
    rsps.add(responses.GET, re.compile(rf"{re.escape(BASE)}/\w+/\d+$"), status=404,
             json=outcome("not-found", "HAPI-2001: Resource is not known"))
    summary = program.sync()
    assert summary.exit_code == 0 and summary.counts["pending"] == 0
    assert not [c for c in rsps.calls if c.request.method == "PUT"]  # nothing left to retire
    with Ledger(program.ledger) as ledger:
        assert ledger.unit("contact:C1").patient_id == "p9"  # type: ignore[union-attr]
    (moved,) = sent_transactions(rsps)[2:]  # the first sync: program-wide, then E1 and E2 in one shared
    new_c1 = next(e for e in moved["entry"] if communications_with({"entry": [e]}, "C1"))
    assert new_c1["resource"]["subject"]["reference"] == "Patient/p9"


# -- what the writer adapts to ---------------------------------------------------------------------------------


def test_without_conditional_update_the_writer_searches_then_writes_by_id(rsps: responses.RequestsMock,
                                                                          program: Program) -> None:
    answer_first_sync(rsps, conditional_update=False)
    existing_c1 = {"resourceType": "Communication", "id": "4711", "meta": {"versionId": "3"}, "status": "completed"}

    def identifier_search(request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        # The server already holds C1's Communication (e.g. an earlier ledger was lost); nothing else.
        c1 = "Communication?" in (request.url or "") and (request.url or "").endswith("C1")
        return reply(200, searchset([existing_c1] if c1 else []))

    rsps.add_callback(responses.GET, re.compile(rf"{re.escape(BASE)}/(?!Patient\?)\w+\?identifier=.+"),
                      callback=identifier_search)
    summary = program.sync()
    assert (summary.counts["created"], summary.counts["updated"]) == (9, 1)
    searched = [r for r in requests_made(rsps) if "?identifier=" in r and "/Patient?" not in r]
    writes = [e for b in sent_transactions(rsps) for e in b["entry"] if e["resource"]["resourceType"] != "Provenance"]
    assert len(searched) == len(writes)  # one search per resource, none for the Provenance
    assert [e["request"] for e in writes if communications_with({"entry": [e]}, "C1")] == [
        {"method": "PUT", "url": "Communication/4711"}]
    assert {e["request"]["method"] for e in writes if not communications_with({"entry": [e]}, "C1")} == {"POST"}

    program.write(contacts=contacts([1, 2, 3, 4, 5, 6], note="edited"))
    calls = len(rsps.calls)
    summary = program.sync()
    assert summary.counts["updated"] == 6
    assert not [r for r in requests_made(rsps, calls) if "?identifier=" in r and "/Patient?" not in r]  # ids known
    resent = [e for b in sent_transactions(rsps)[2:] for e in b["entry"]
              if e["resource"]["resourceType"] == "Communication"]
    assert {e["request"]["url"] for e in resent} == {location_of(rsps, "Communication", f"C{i}") for i in range(1, 7)}
    assert all(e["request"]["method"] == "PUT" and e["resource"]["id"] == e["request"]["url"].split("/")[1]
               for e in resent)


def test_two_matches_for_one_identifier_in_search_then_write_go_to_review(rsps: responses.RequestsMock,
                                                                         program: Program) -> None:
    answer_first_sync(rsps, conditional_update=False)
    twins = [{"resourceType": "Communication", "id": i, "status": "completed"} for i in ("4711", "4712")]

    def identifier_search(request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        # The server holds two Communications with C1's identifier (someone else created a copy).
        c1 = "Communication?" in (request.url or "") and (request.url or "").endswith("C1")
        return reply(200, searchset(twins if c1 else []))

    rsps.add_callback(responses.GET, re.compile(rf"{re.escape(BASE)}/(?!Patient\?)\w+\?identifier=.+"),
                      callback=identifier_search)
    summary = program.sync()
    assert summary.counts["in_review"] == 1 and summary.counts["pending"] == 0
    assert summary.counts["created"] == 9  # the participant's other records still land
    with Ledger(program.ledger) as ledger:
        (entry,) = [r for r in ledger.reviews() if r["reason"] == "duplicate-on-server"]
    assert entry["subject"] == "contact:C1"


def test_a_server_without_conditional_create_on_provenance_gets_a_plain_post(rsps: responses.RequestsMock,
                                                                              program: Program) -> None:
    answer_first_sync(rsps, provenance_conditional_create=False)
    program.sync()
    provenance_requests = [p["request"] for b in sent_transactions(rsps) for p in provenances_in(b)]
    # the program's bundle: 1 (the program); each participant's: 2 (the program for the CarePlan and CareTeam, S1
    # for the contacts S1 sent)
    assert provenance_requests == [{"method": "POST", "url": "Provenance"}] * 5


def test_write_mode_conditional_does_not_read_the_capability_statement(rsps: responses.RequestsMock,
                                                                       program: Program) -> None:
    answer_patient_search(rsps, "MRN1", "p1")
    answer_patient_search(rsps, "MRN2", "p2")
    rsps.add_callback(responses.POST, f"{BASE}/", callback=answer_transactions())
    assert program.sync(write_mode="conditional", write_strategy="transaction").exit_code == 0
    assert "GET /metadata" not in requests_made(rsps)
    assert all("?identifier=" in e["request"]["url"] for b in sent_transactions(rsps) for e in not_provenances(b))


def test_every_transaction_answer_has_one_located_entry_per_request_entry() -> None:
    """The canned answers are shaped as the writer's response check expects of a real server."""
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Goal"},
         "request": {"method": "PUT", "url": "Goal?identifier=s%7Cv"}},
        {"fullUrl": "urn:uuid:2", "resource": {"resourceType": "Communication"},
         "request": {"method": "PUT", "url": "Communication/77"}},
        {"fullUrl": "urn:uuid:3", "resource": {"resourceType": "Provenance"},
         "request": {"method": "POST", "url": "Provenance", "ifNoneExist": "_tag=s|c"}}]}
    answer = transaction_response(bundle)
    assert answer["type"] == "transaction-response" and len(answer["entry"]) == 3
    goal, communication, provenance = (e["response"] for e in answer["entry"])
    assert goal["status"] == "201 Created" and re.fullmatch(r"Goal/\d+/_history/1", goal["location"])
    assert communication == {**communication, "status": "200 OK", "location": "Communication/77/_history/2"}
    assert re.fullmatch(r"Provenance/\d+/_history/1", provenance["location"])
    assert transaction_response(bundle) == answer  # the same request, the same ids
