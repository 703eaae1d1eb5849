"""Write strategies and references peersync resolves: the pure decisions (strategy choice, deterministic ids,
reference order under chunking and bisection, batch waves, deferrable references) and the stepwise sender's
answer verification and If-Match retry over `responses`."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
import responses
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.identifiers import conditional_reference
from connector.map import MappingContext
from connector.read.profile import load_profile
from connector.server.capabilities import Capabilities
from connector.server.client import Action, FhirClient, RetryPolicy
from connector.write.bundle import PendingWrite, UnitWrite, identity_of
from connector.write.confirm import confirm_single, stored_conditional_references
from connector.write.decisions import (
    CONDITIONAL_EVERYWHERE,
    Strategy,
    choose_strategy,
    chunk_writes,
    deterministic_id,
    halves,
    reference_order,
    references_of,
    request_waves,
    strip_deferrable,
)
from connector.write.stepwise import KnownIds, StepwiseSender

BASE = "http://fhir.test/r4"
FAST = RetryPolicy(attempts=0, backoff_factor=0.0, backoff_max=0.0, jitter=0.0, retry_after_cap=0.0)
CTX = MappingContext.from_profile(load_profile("peersync-template"))
SYSTEM = "https://example.org/sid/p/goal"


def statement(*system: str, update_create: bool = False) -> Capabilities:
    return Capabilities.parse({"resourceType": "CapabilityStatement", "rest": [{
        "mode": "server", "interaction": [{"code": c} for c in system],
        "resource": [{"type": t, "updateCreate": update_create} for t in ("Goal", "Communication")]}]})


# -- strategy choice -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("system", "expected"), [
    (("transaction", "batch", "history-system"), Strategy.TRANSACTION),
    (("transaction",), Strategy.TRANSACTION),
    (("batch", "search-system"), Strategy.BATCH),
    (("history-system",), Strategy.SINGLE),
    ((), Strategy.TRANSACTION),  # nothing declared at system level: the standard's default
])
def test_auto_picks_transaction_then_batch_then_single(system: tuple[str, ...], expected: Strategy) -> None:
    choice = choose_strategy("auto", statement(*system))
    assert choice.strategy is expected
    assert choice.reason.startswith("auto:")
    assert choice.peersync_resolves_references is (expected is not Strategy.TRANSACTION)


def test_auto_without_a_statement_assumes_transaction_and_never_picks_update_as_create() -> None:
    assert choose_strategy("auto", None).strategy is Strategy.TRANSACTION
    assert choose_strategy("auto", statement("batch", update_create=True)).strategy is Strategy.BATCH


def test_configured_strategy_wins_and_update_as_create_warns_without_update_create() -> None:
    refused = choose_strategy("update-as-create", statement("transaction"), written_types=["Goal"])
    assert refused.strategy is Strategy.UPDATE_AS_CREATE and "no updateCreate declared for Goal" in refused.reason
    allowed = choose_strategy("update-as-create", statement("transaction", update_create=True), written_types=["Goal"])
    assert allowed.reason == "server.write_strategy = update-as-create"
    assert choose_strategy("single", statement("transaction")).strategy is Strategy.SINGLE


def test_a_transaction_on_a_server_that_does_not_resolve_conditional_references_is_resolved_by_peersync() -> None:
    choice = choose_strategy("auto", statement("transaction"), resolves_conditional_references=False)
    assert choice.strategy is Strategy.TRANSACTION and choice.peersync_resolves_references
    assert "peersync resolves references" in choice.reason


# -- deterministic ids ---------------------------------------------------------------------------------

@given(st.text(max_size=40), st.text(min_size=1, max_size=40))
def test_deterministic_ids_are_stable_valid_fhir_ids_and_never_numeric(system: str, value: str) -> None:
    resource_id = deterministic_id("Goal", system, value)
    assert resource_id == deterministic_id("Goal", system, value)
    assert re.fullmatch(r"[A-Za-z0-9.-]{1,64}", resource_id) and not resource_id.isdigit()


def test_deterministic_ids_differ_per_type_system_and_value() -> None:
    ids = {deterministic_id(t, s, v) for t in ("Goal", "CarePlan") for s in ("a", "b") for v in ("1", "2")}
    assert len(ids) == 8


# -- reference order -----------------------------------------------------------------------------------

def goal(key: str, refs: list[str], kind: str = "goal") -> PendingWrite:
    resource = {"resourceType": "Goal", "identifier": [{"system": SYSTEM, "value": key}],
                "addresses": [{"reference": conditional_reference("Goal", SYSTEM, r)} for r in refs]}
    return PendingWrite(UnitWrite(f"{kind}:{key}", kind, [resource]), "h")


@st.composite
def acyclic_units(draw: Any) -> list[PendingWrite]:
    """Units whose references point at units with a lower number (a DAG), in a random given order."""
    count = draw(st.integers(1, 25))
    units = [goal(str(i), [str(t) for t in draw(st.sets(st.integers(0, i - 1), max_size=4))] if i else [])
             for i in range(count)]
    return draw(st.permutations(units))


def targets_of(write: PendingWrite) -> set[str]:
    return {t[2] for r in write.unit.resources for t, _ in references_of(r)}


def key(write: PendingWrite) -> str:
    return identity_of(write.unit.resources[0])[2]


def assert_targets_first(sent: list[list[PendingWrite]], *, same_request_resolves: bool) -> None:
    written: set[str] = set()
    for request in sent:
        here = {key(w) for w in request}
        for write in request:
            allowed = written | here if same_request_resolves else written
            assert targets_of(write) <= allowed, f"{key(write)} sent before {targets_of(write) - allowed}"
        written |= here


def bisected(chunk: list[PendingWrite], depth: int) -> list[list[PendingWrite]]:
    """The requests a chunk rejected ``depth`` times in a row becomes (each half sent in turn, first half first)."""
    if depth == 0 or len(chunk) < 2:
        return [chunk]
    first, second = halves(chunk)
    return bisected(first, depth - 1) + bisected(second, depth - 1)


@settings(max_examples=200, deadline=None)
@given(acyclic_units(), st.integers(1, 9), st.integers(0, 4))
def test_no_chunk_or_bisection_half_sends_a_referrer_before_its_target(units: list[PendingWrite], size: int,
                                                                      depth: int) -> None:
    ordered = reference_order(units)
    assert sorted(map(key, ordered)) == sorted(map(key, units))
    chunks = list(chunk_writes(ordered, size))
    assert_targets_first(chunks, same_request_resolves=True)
    assert_targets_first([half for chunk in chunks for half in bisected(chunk, depth)], same_request_resolves=True)


@settings(max_examples=200, deadline=None)
@given(acyclic_units())
def test_batch_waves_put_every_target_in_an_earlier_request(units: list[PendingWrite]) -> None:
    ordered = reference_order(units)
    position = {key(w): i for i, w in enumerate(ordered)}
    waves = request_waves([{position[t] for t in targets_of(w)} for w in ordered], one_per_request=False)
    assert_targets_first([[ordered[i] for i in wave] for wave in waves], same_request_resolves=False)
    singles = request_waves([set()] * len(ordered), one_per_request=True)
    assert singles == [[i] for i in range(len(ordered))]


def careplan_and_request() -> list[PendingWrite]:
    cp_system, cr_system = "https://e.org/sid/p/careplan", "https://e.org/sid/p/contact-request"
    careplan = {"resourceType": "CarePlan", "identifier": [{"system": cp_system, "value": "e1"}],
                "activity": [{"reference": {"reference": conditional_reference("CommunicationRequest", cr_system,
                                                                               "r1")}}]}
    request = {"resourceType": "CommunicationRequest", "identifier": [{"system": cr_system, "value": "r1"}],
               "basedOn": [{"reference": conditional_reference("CarePlan", cp_system, "e1")}]}
    return [PendingWrite(UnitWrite("planned_contact:r1", "planned_contact", [request]), "h1"),
            PendingWrite(UnitWrite("enrollment:e1", "enrollment", [careplan]), "h2")]


def test_the_careplan_cycle_goes_careplan_first_without_activities_then_complete() -> None:
    ordered = reference_order(careplan_and_request())
    assert [w.unit.unit_key for w in ordered] == ["enrollment:e1", "planned_contact:r1"]
    sent, incomplete = strip_deferrable(ordered[:1], lambda _target: False)
    assert "activity" not in sent[0].unit.resources[0] and list(incomplete) == ["enrollment:e1"]
    assert "activity" in incomplete["enrollment:e1"].unit.resources[0]  # the complete unit, for later
    assert "activity" in ordered[0].unit.resources[0]  # the mapped unit is left as it was
    sent, incomplete = strip_deferrable(ordered[:1], lambda _target: True)
    assert sent == ordered[:1] and incomplete == {}


# -- answers to single writes --------------------------------------------------------------------------

def test_a_single_write_is_believed_only_when_the_answer_proves_it() -> None:
    stored = {"resourceType": "Goal", "id": "g1", "meta": {"versionId": "3"},
              "identifier": [{"system": SYSTEM, "value": "1"}]}
    assert confirm_single("Goal", (SYSTEM, "1"), 201, stored, None, None).server_id == "g1"
    assert confirm_single("Goal", (SYSTEM, "1"), 201, stored, None, None).version == "3"
    assert confirm_single("Goal", (SYSTEM, "1"), 201, None, "http://x/Goal/g2/_history/4", None).version == "4"
    assert confirm_single("Goal", (SYSTEM, "1"), 200, None, "Goal/g2", 'W/"7"').version == "7"
    assert not confirm_single("Goal", (SYSTEM, "2"), 200, stored, None, None).confirmed  # another identifier
    assert not confirm_single("Goal", (SYSTEM, "1"), 200, None, None, None).confirmed  # nothing names it
    assert not confirm_single("Goal", (SYSTEM, "1"), 200, stored, "Goal/other", None).confirmed
    assert confirm_single("Provenance", None, 200, None, None, None, conditional_create=True).confirmed


def test_a_stored_conditional_reference_is_found() -> None:
    assert stored_conditional_references({"basedOn": [{"reference": "CarePlan?identifier=s|v"}],
                                          "subject": {"reference": "Patient/1"}}) == ["CarePlan"]


# -- the stepwise sender over responses ----------------------------------------------------------------

NOW = datetime(2026, 7, 1, tzinfo=UTC)


def stored_answer(request: Any, resource_id: str, version: str) -> tuple[int, dict[str, str], str]:
    body = json.loads(request.body)
    body.update(id=resource_id, meta={"versionId": version})
    return 201, {"Location": f"{BASE}/{body['resourceType']}/{resource_id}/_history/{version}"}, json.dumps(body)


def program_written(identity: tuple[str, str, str]) -> tuple[str, str | None] | None:
    """The program's Organization and Device (the Provenance's agents) were written before; the Goals were not."""
    return None if identity[0] == "Goal" else (f"{identity[0].lower()}-1", "1")


@responses.activate
def test_single_writes_resolve_references_to_literal_ids_in_order() -> None:
    units = reference_order([goal("2", ["1"]), goal("1", [])])
    responses.add_callback(responses.PUT, re.compile(f"{BASE}/Goal\\?identifier=.*"),
                           callback=lambda r: stored_answer(r, "id-" + r.url[-1], "1"))
    responses.add_callback(responses.POST, f"{BASE}/Provenance", callback=lambda r: stored_answer(r, "pv", "1"))
    known = KnownIds()
    outcomes = StepwiseSender(FhirClient(BASE, retry=FAST), Strategy.SINGLE, CONDITIONAL_EVERYWHERE, CTX).send(
        units, patient=None, resolve=program_written, known=known, recorded=NOW)
    assert all(o.failure is None for o in outcomes.values()), outcomes
    sent = [json.loads(c.request.body) for c in responses.calls if c.request.method == "PUT"]
    assert sent[0]["addresses"] == [] and sent[1]["addresses"] == [{"reference": "Goal/id-1"}]
    provenance = json.loads(responses.calls[-1].request.body)
    assert {t["reference"] for t in provenance["target"]} == {"Goal/id-1", "Goal/id-2"}
    assert responses.calls[-1].request.headers["If-None-Exist"].startswith("_tag=")


@responses.activate
def test_update_as_create_sends_if_match_and_retries_a_version_conflict_once() -> None:
    resource_id = deterministic_id("Goal", SYSTEM, "1")
    url = f"{BASE}/Goal/{resource_id}"
    responses.add(responses.PUT, url, status=412, json={"resourceType": "OperationOutcome", "issue": []})
    responses.add(responses.GET, url, json={"resourceType": "Goal", "id": resource_id, "meta": {"versionId": "5"}})
    responses.add_callback(responses.PUT, url, callback=lambda r: stored_answer(r, resource_id, "6"))
    responses.add_callback(responses.POST, f"{BASE}/Provenance", callback=lambda r: stored_answer(r, "pv", "1"))
    known = KnownIds()
    sender = StepwiseSender(FhirClient(BASE, retry=FAST), Strategy.UPDATE_AS_CREATE, CONDITIONAL_EVERYWHERE, CTX)
    outcomes = sender.send([goal("1", [])], patient=None, resolve=lambda i: (resource_id, "4") if i[0] == "Goal"
                           else program_written(i), known=known,
                           recorded=NOW)
    assert outcomes["goal:1"].failure is None
    assert outcomes["goal:1"].resources == [("Goal", SYSTEM, "1", resource_id, "6")]
    puts = [c.request for c in responses.calls if c.request.method == "PUT"]
    assert [p.headers["If-Match"] for p in puts] == ['W/"4"', 'W/"5"']


@responses.activate
def test_a_second_version_conflict_leaves_the_unit_pending_with_the_reason() -> None:
    resource_id = deterministic_id("Goal", SYSTEM, "1")
    url = f"{BASE}/Goal/{resource_id}"
    responses.add(responses.PUT, url, status=412, json={"resourceType": "OperationOutcome", "issue": []})
    responses.add(responses.GET, url, json={"resourceType": "Goal", "id": resource_id, "meta": {"versionId": "5"}})
    sender = StepwiseSender(FhirClient(BASE, retry=FAST), Strategy.UPDATE_AS_CREATE, CONDITIONAL_EVERYWHERE, CTX)
    outcomes = sender.send([goal("1", [])], patient=None, resolve=lambda _i: (resource_id, "4"), known=KnownIds(),
                           recorded=NOW)
    failure = outcomes["goal:1"].failure
    assert failure is not None and failure.action is Action.CONFLICT and "If-Match" in failure.reason
    assert not any(c.request.url.endswith("/Provenance") for c in responses.calls)


@responses.activate
def test_a_stored_resource_whose_reference_the_server_kept_conditional_is_not_landed() -> None:
    def keeps_conditional(request: Any) -> tuple[int, dict[str, str], str]:
        body = json.loads(request.body)
        body.update(id="g2", addresses=[{"reference": "Goal?identifier=x|1"}])
        return 201, {}, json.dumps(body)

    responses.add_callback(responses.PUT, re.compile(f"{BASE}/Goal.*"), callback=keeps_conditional)
    outcomes = StepwiseSender(FhirClient(BASE, retry=FAST), Strategy.SINGLE, CONDITIONAL_EVERYWHERE, CTX).send(
        [goal("2", [])], patient=None, resolve=lambda _i: None, known=KnownIds(), recorded=NOW)
    failure = outcomes["goal:2"].failure
    assert failure is not None and failure.unresolved_reference and "unresolved" in failure.reason


@responses.activate
def test_a_batch_answers_per_entry_and_a_refused_entry_fails_only_its_unit() -> None:
    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        bundle = json.loads(request.body)
        assert bundle["type"] == "batch"
        entries = [{"response": {"status": "201 Created", "location": "Goal/a/_history/1"}},
                   {"response": {"status": "400 Bad Request", "outcome": {
                       "resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]}}}]
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "batch-response", "entry": entries})

    responses.add_callback(responses.POST, f"{BASE}/", callback=answer)
    responses.add_callback(responses.POST, f"{BASE}/Provenance", callback=lambda r: stored_answer(r, "pv", "1"))
    outcomes = StepwiseSender(FhirClient(BASE, retry=FAST), Strategy.BATCH, CONDITIONAL_EVERYWHERE, CTX).send(
        [goal("1", []), goal("2", [])], patient=None, resolve=program_written, known=KnownIds(),
        recorded=NOW)
    assert outcomes["goal:1"].failure is None
    failure = outcomes["goal:2"].failure
    assert failure is not None and failure.action is Action.ISOLATE and "HTTP 400" in failure.reason


# -- the reference checker -----------------------------------------------------------------------------

@responses.activate
def test_the_reference_checker_reports_stored_conditional_and_dangling_references() -> None:
    from connector.ops.references import check_references

    stored = {
        "Communication": [{"resourceType": "Communication", "id": "c1",
                           "basedOn": [{"reference": "CarePlan?identifier=s|e1"}],
                           "subject": {"reference": "Patient/p1"}, "about": [{"reference": "Goal/g1"}]}],
        "Goal": [{"resourceType": "Goal", "id": "g1", "subject": {"reference": "Patient/p1"}}],
        "Task": [{"resourceType": "Task", "id": "t1", "focus": {"reference": "ServiceRequest/gone"}}],
    }

    def search(request: Any) -> tuple[int, dict[str, str], str]:
        resource_type = request.path_url.split("?")[0].rsplit("/", 1)[1]
        found = stored.pop(resource_type, [])  # each type once (two identifier kinds share Organization)
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "searchset",
                                    "entry": [{"resource": r} for r in found]})

    responses.add_callback(responses.GET, re.compile(f"{BASE}/[A-Za-z]+\\?.*"), callback=search)
    responses.add(responses.GET, f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    responses.add(responses.GET, f"{BASE}/ServiceRequest/gone", status=404,
                  json={"resourceType": "OperationOutcome", "issue": []})
    report = check_references(FhirClient(BASE, retry=FAST), CTX)
    assert report.checked == 5 and report.scanned == {"Communication": 1, "Goal": 1, "Task": 1}
    assert {(b.referrer, b.element, b.target, b.why) for b in report.broken} == {
        ("Communication/c1", "basedOn", "CarePlan", "stored conditional"),
        ("Task/t1", "focus", "ServiceRequest", "not on the server")}
    assert sum(c.request.url.endswith("/Patient/p1") for c in responses.calls) == 1  # each target read once


@responses.activate
@pytest.mark.parametrize("strategy", [Strategy.SINGLE, Strategy.BATCH])
def test_stepwise_provenances_credit_each_contact_to_the_supporter_the_source_names(strategy: Strategy) -> None:
    """Issue 19 authorship on the batch/single path (StepwiseSender._send_provenance): the oracle is the source
    contacts' supporter_id, not the elements the Provenance grouping reads."""
    from datetime import date

    from connector.map import map_contact
    from connector.model import Contact, Enrollment

    enrollment = Enrollment(enrollment_id="E1", mrn="M1", start_date=date(2025, 1, 6), supporter_id="S01")
    contacts = [Contact(contact_id=cid, enrollment_id="E1", supporter_id=sid, mode="telephone",
                        occurred_at=datetime(2025, 2, day, 15, tzinfo=UTC))
                for cid, sid, day in (("C1", "S01", 3), ("C2", "S02", 4), ("C3", "S02", 5))]
    units = [PendingWrite(UnitWrite(f"contact:{c.contact_id}", "contact", [map_contact(c, enrollment, CTX)]), "h")
             for c in contacts]

    def stored_id(identity: tuple[str, str, str]) -> str:
        return f"{identity[0].lower()}-{identity[2]}"

    def single(request: Any) -> tuple[int, dict[str, str], str]:
        value = re.search(r"%7C([^&]+)$", request.url) or re.search(r"\|([^&]+)$", request.url)
        assert value is not None
        return stored_answer(request, f"communication-{value.group(1)}", "1")

    def batch(request: Any) -> tuple[int, dict[str, str], str]:
        bundle = json.loads(request.body)
        entries = [{"response": {"status": "201 Created", "location":
                                 f"Communication/communication-{e['resource']['identifier'][0]['value']}/_history/1"}}
                   for e in bundle["entry"]]
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "batch-response", "entry": entries})

    responses.add_callback(responses.PUT, re.compile(f"{BASE}/Communication.*"), callback=single)
    responses.add_callback(responses.POST, f"{BASE}/", callback=batch)
    responses.add_callback(responses.POST, f"{BASE}/Provenance", callback=lambda r: stored_answer(r, "pv", "1"))
    outcomes = StepwiseSender(FhirClient(BASE, retry=FAST), strategy, CONDITIONAL_EVERYWHERE, CTX).send(
        units, patient=None, known=KnownIds(), recorded=NOW,
        resolve=lambda i: None if i[0] == "Communication" else (stored_id(i), "1"))
    assert all(o.failure is None for o in outcomes.values()), outcomes
    provenances = [json.loads(c.request.body) for c in responses.calls if c.request.url == f"{BASE}/Provenance"]
    credited = {}
    for provenance in provenances:
        (agent,) = [a for a in provenance["agent"] if a["type"]["coding"][0]["code"] == "author"]
        author = agent["who"]["reference"]
        assert author.startswith("PractitionerRole/practitionerrole-"), author
        credited[author.removeprefix("PractitionerRole/practitionerrole-")] = {
            t["reference"].removeprefix("Communication/communication-") for t in provenance["target"]}
    # the source says who wrote each contact
    expected: dict[str, set[str]] = {}
    for c in contacts:
        expected.setdefault(c.supporter_id, set()).add(c.contact_id)
    assert credited == expected
