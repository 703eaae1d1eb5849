"""A server answer is believed only when it proves the write; redirects, HTML, non-searchset answers and slow or
long-waiting servers are errors with exit 69; server diagnostics are kept only in their known-safe parts."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import responses
from responses.registries import OrderedRegistry
from urllib3.response import HTTPResponse

from connector.errors import (
    ExitCode,
    RunDeadlineError,
    ServerAnswerError,
    ServerUnavailableError,
)
from connector.map import MappingContext
from connector.plan.ledger import Ledger, UnitState
from connector.read.profile import load_profile
from connector.run import SyncOptions, exit_for
from connector.server import client as client_module
from connector.server.client import (
    FhirClient,
    FhirHttpError,
    RetryPolicy,
    summarize_outcome,
)
from connector.write.bundle import PendingWrite, UnitWrite
from connector.write.confirm import confirm_writes
from connector.write.writer import Writer

BASE = "https://ehr.test/fhir"
FAST = RetryPolicy(attempts=3, backoff_factor=0.0, backoff_max=0.0, jitter=0.0, retry_after_cap=10.0)


def _request(n: int = 2, *, conditional_create_last: bool = False) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [{"request": {"method": "PUT", "url": f"Goal?identifier=s|g{i}"}}
                                     for i in range(n)]
    if conditional_create_last:
        entries[-1] = {"request": {"method": "POST", "url": "Provenance", "ifNoneExist": "_tag=s|c"}}
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _answer(*entries: dict[str, Any], kind: str = "transaction-response") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": [{"response": e} for e in entries]}


CREATED = {"status": "201 Created", "location": "Goal/7/_history/1"}


# -- confirm_writes: pure -------------------------------------------------------------------------------------------


def test_a_full_transaction_response_confirms_every_entry_with_its_id_and_version() -> None:
    result = confirm_writes(_request(), 200, _answer(CREATED, {"status": "200 OK", "location": "Goal/8/_history/3"}))
    assert result.all_confirmed and result.reason is None
    assert [(v.status, v.server_id, v.version) for v in result.entries] == [("201", "7", "1"), ("200", "8", "3")]


def test_a_batch_response_confirms_entry_by_entry() -> None:
    result = confirm_writes(_request(), 200, _answer(CREATED, {"status": "400 Bad Request"}, kind="batch-response"))
    assert [v.confirmed for v in result.entries] == [True, False]
    assert result.entries[1].reason == "an answer entry has HTTP 400"


@pytest.mark.parametrize(("status", "body", "content_type", "reason"), [
    (200, _answer(), "application/fhir+json", "the server's answer has 0 entries for 2 sent"),
    (200, _answer(CREATED), "application/fhir+json", "the server's answer has 1 entries for 2 sent"),
    (200, {"resourceType": "OperationOutcome", "issue": []}, "application/fhir+json",
     "the server answered HTTP 200 with OperationOutcome, not a transaction-response Bundle"),
    (200, {"resourceType": "Bundle", "type": "searchset", "entry": []}, "application/fhir+json",
     "the server answered with a Bundle of type searchset, not a transaction-response"),
    (200, None, "text/html; charset=utf-8", "the server answered HTTP 200 with a text/html body, not a FHIR Bundle"),
    (200, None, "", "the server answered HTTP 200 with an empty or unreadable body, not a FHIR Bundle"),
    (204, None, "application/fhir+json",
     "the server answered HTTP 204 with an empty or unreadable body, not a FHIR Bundle"),
    (302, _answer(CREATED, CREATED), "application/json", "the server answered HTTP 302, not 2xx"),
    (200, ["not", "a", "bundle"], "application/json",
     "the server answered HTTP 200 with list, not a transaction-response Bundle"),
])
def test_an_answer_that_does_not_prove_the_writes_confirms_nothing(status: int, body: Any, content_type: str,
                                                                   reason: str) -> None:
    result = confirm_writes(_request(), status, body, content_type)
    assert not any(v.confirmed for v in result.entries) and len(result.entries) == 2
    assert result.reason == reason == result.first_reason()


@pytest.mark.parametrize(("entry", "reason"), [
    ({}, "an answer entry has no HTTP status"),
    ({"status": "OK"}, "an answer entry has no HTTP status"),
    ({"status": "201 Created"}, "an answer entry has HTTP 201 but no location"),
    ({"status": "200", "location": ""}, "an answer entry has HTTP 200 but no location"),
    ({"status": "304 Not Modified"}, "an answer entry has HTTP 304"),
    ({"status": "302 Found", "location": "Goal/1"}, "an answer entry has HTTP 302"),
])
def test_an_entry_without_a_2xx_status_and_a_location_is_not_confirmed(entry: dict[str, Any], reason: str) -> None:
    result = confirm_writes(_request(), 200, _answer(CREATED, entry))
    assert [v.confirmed for v in result.entries] == [True, False]
    assert result.entries[1].reason == reason and result.first_reason() == reason


def test_an_entry_without_a_response_element_is_not_confirmed() -> None:
    body = {"resourceType": "Bundle", "type": "transaction-response", "entry": [{"response": CREATED}, {}]}
    assert confirm_writes(_request(), 200, body).entries[1].reason == "an answer entry has no response"


@pytest.mark.parametrize("status", ["200 OK", "304 Not Modified"])
def test_a_conditional_create_that_matched_is_confirmed_without_a_location(status: str) -> None:
    result = confirm_writes(_request(conditional_create_last=True), 200, _answer(CREATED, {"status": status}))
    assert result.all_confirmed and result.entries[1].server_id is None


def test_reasons_never_carry_what_the_server_put_in_free_fields() -> None:
    body = {"resourceType": "Bundle", "type": "Maria Lopez has diabetes", "entry": []}
    assert "Maria" not in (confirm_writes(_request(), 200, body).reason or "")


# -- the client: no redirects, no HTML, searches must be searchsets ------------------------------------------------


@responses.activate
def test_a_302_with_a_json_body_is_never_followed_nor_success() -> None:
    responses.post(BASE + "/", status=302, json=_answer(CREATED), headers={"Location": "https://other.test/fhir?x=1"})
    responses.post("https://other.test/fhir", json=_answer(CREATED))
    with pytest.raises(ServerAnswerError) as caught:
        FhirClient(BASE, retry=FAST).send_transaction(_request(1))
    assert caught.value.exit_code == ExitCode.SERVER_UNAVAILABLE == 69
    assert "HTTP 302 to https://other.test/fhir" in str(caught.value) and "x=1" not in str(caught.value)
    assert len(responses.calls) == 1


@responses.activate
def test_a_2xx_html_answer_reaches_the_confirmation_as_no_body() -> None:
    responses.post(BASE + "/", body="<html><body>Welcome Maria</body></html>", content_type="text/html")
    answer = FhirClient(BASE, retry=FAST).send_transaction(_request(1))
    assert (answer.status, answer.body, answer.content_type) == (200, None, "text/html")
    assert confirm_writes(_request(1), answer.status, answer.body, answer.content_type).reason == \
        "the server answered HTTP 200 with a text/html body, not a FHIR Bundle"


@responses.activate
@pytest.mark.parametrize(("body", "content_type"), [("<html>login</html>", "text/html"), ("", "application/json")])
def test_reads_and_plain_transactions_with_html_or_empty_2xx_are_server_answer_errors(body: str,
                                                                                     content_type: str) -> None:
    responses.get(BASE + "/Patient/1", body=body, content_type=content_type)
    responses.post(BASE + "/", body=body, content_type=content_type)
    client = FhirClient(BASE, retry=FAST)
    for call in (lambda: client.read("Patient", "1"), lambda: client.transaction(_request(1))):
        with pytest.raises(ServerAnswerError, match="not a FHIR resource"):
            call()


@responses.activate
@pytest.mark.parametrize("body", [
    {"resourceType": "OperationOutcome", "issue": []},
    {"resourceType": "Bundle", "type": "transaction-response", "entry": []},
    {"resourceType": "Bundle", "entry": []},
])
def test_a_patient_search_answered_with_anything_but_a_searchset_is_an_error_not_no_match(body: dict) -> None:
    responses.get(BASE + "/Patient", json=body)
    client = FhirClient(BASE, retry=FAST)
    with pytest.raises(ServerAnswerError, match="not a searchset Bundle"):
        client.search_raw("Patient?identifier=s%7C1")
    with pytest.raises(ServerAnswerError, match="not a searchset Bundle"):
        list(client.search("Patient", {"identifier": "s|1"}))


@responses.activate
def test_a_patient_search_answered_with_a_redirect_or_an_error_status_is_an_error() -> None:
    responses.get(BASE + "/Patient", status=301, headers={"Location": BASE + "/login"})
    with pytest.raises(ServerAnswerError, match="HTTP 301"):
        FhirClient(BASE, retry=FAST).search_raw("Patient?identifier=s%7C1")
    responses.replace(responses.GET, BASE + "/Patient", status=404, json={"resourceType": "OperationOutcome"})
    with pytest.raises(FhirHttpError):
        FhirClient(BASE, retry=FAST).search_raw("Patient?identifier=s%7C1")


# -- the writer: unconfirmed units stay pending with the reason, and the run exits 69 -------------------------------


def _writer(tmp_path: Path) -> Writer:
    profile = load_profile("peersync-template")
    opts = SyncOptions(profile=profile, inputs=[], ledger_path=tmp_path / "ledger.sqlite",
                       ctx=MappingContext.from_profile(profile), rejects_dir=tmp_path / "rejects")
    writer = Writer(opts, FhirClient(BASE, retry=FAST), Counter())
    writer._provenance_conditional_create = True
    return writer


def _units() -> list[PendingWrite]:
    goal = {"resourceType": "Goal", "identifier": [{"system": "https://p/sid/x/goal", "value": "G1"}]}
    note = {"resourceType": "Communication", "identifier": [{"system": "https://p/sid/x/contact", "value": "C1"}]}
    return [PendingWrite(UnitWrite("goal:G1", "goal", [goal]), "h1"),
            PendingWrite(UnitWrite("contact:C1", "contact", [note]), "h2")]


@responses.activate
@pytest.mark.parametrize(("answer", "reason"), [
    (_answer(), "not confirmed: the server's answer has 0 entries for 3 sent"),
    (_answer(CREATED, CREATED), "not confirmed: the server's answer has 2 entries for 3 sent"),
    (_answer(CREATED, CREATED, {"status": "201 Created"}), ("not confirmed: Provenance: an answer entry has HTTP 201 "
                                                           "but no location")),
])
def test_units_the_answer_does_not_prove_stay_pending_with_the_reason(tmp_path: Path, answer: dict,
                                                                      reason: str) -> None:
    responses.post(BASE + "/", json=answer)
    writer = _writer(tmp_path)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        writer._send(ledger, _units(), patient=None, participant="E1")
        states = {key: ledger.unit(key) for key in ("goal:G1", "contact:C1")}
    assert {key: (u.state, u.detail) for key, u in states.items() if u} == {
        "goal:G1": (UnitState.PENDING, reason), "contact:C1": (UnitState.PENDING, reason)}
    assert writer.counts["pending"] == 2 and writer.pending_reasons == Counter({reason: 2})
    assert exit_for(writer.counts) == (69, "incomplete")


@responses.activate
def test_only_the_unit_whose_entry_is_unproven_stays_pending(tmp_path: Path) -> None:
    responses.post(BASE + "/", json=_answer(CREATED, {"status": "200 OK"}, {"status": "200 OK"}, kind="batch-response"))
    writer = _writer(tmp_path)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        writer._send(ledger, _units(), patient=None, participant="E1")
        goal, contact = ledger.unit("goal:G1"), ledger.unit("contact:C1")
        goal_ids = ledger.resources_of("goal:G1")
    assert goal is not None and goal.state == UnitState.SENT and [r.server_id for r in goal_ids] == ["7"]
    assert contact is not None and contact.state == UnitState.PENDING
    assert contact.detail == "not confirmed: an answer entry has HTTP 200 but no location"


@responses.activate
def test_a_confirmed_transaction_marks_every_unit_sent(tmp_path: Path) -> None:
    responses.post(BASE + "/", json=_answer(CREATED, {"status": "200 OK", "location": "Communication/9/_history/2"},
                                            {"status": "200 OK"}))
    writer = _writer(tmp_path)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        writer._send(ledger, _units(), patient=None, participant="E1")
        units = [ledger.unit(key) for key in ("goal:G1", "contact:C1")]
    assert [u.state for u in units if u] == [UnitState.SENT, UnitState.SENT]
    assert writer.counts == Counter(created=1, updated=1) and not writer.pending_reasons


# -- deadlines and Retry-After -----------------------------------------------------------------------------------


@responses.activate
def test_a_body_still_arriving_at_the_request_deadline_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read of the body is checked against the deadline (here a clock that moves 10 s per look)."""
    responses.post(BASE + "/", json=_answer(CREATED))
    ticks = itertools.count(0, 10)
    monkeypatch.setattr(client_module.time, "monotonic", lambda: float(next(ticks)))
    client = FhirClient(BASE, retry=FAST, timeout=5, request_deadline=15)
    with pytest.raises(ServerUnavailableError, match="no complete answer within"):
        client.send_transaction(_request(1))


@responses.activate
def test_nothing_is_sent_after_the_run_deadline() -> None:
    responses.post(BASE + "/", json=_answer(CREATED))
    client = FhirClient(BASE, retry=FAST)
    client.deadline.start(0)
    with pytest.raises(RunDeadlineError, match=r"sync\.run_deadline_seconds") as caught:
        client.send_transaction(_request(1))
    assert caught.value.exit_code == 69 and len(responses.calls) == 0


@responses.activate(registry=OrderedRegistry)
def test_a_retry_after_longer_than_the_cap_is_not_waited_for() -> None:
    """One request, no retry (the mock transport does not sleep: the number of requests is what tells)."""
    responses.post(BASE + "/", status=503, headers={"Retry-After": "100000"})
    responses.post(BASE + "/", json=_answer(CREATED))
    client = FhirClient(BASE, retry=FAST)
    with pytest.raises(ServerUnavailableError, match="asked to retry after '100000'"):
        client.send_transaction(_request(1))
    assert len(responses.calls) == 1


@responses.activate(registry=OrderedRegistry)
def test_retry_after_waits_add_up_to_at_most_the_cap_per_request() -> None:
    for _ in range(4):
        responses.post(BASE + "/", status=429, headers={"Retry-After": "4"})
    client = FhirClient(BASE, retry=FAST)  # cap 10 s: two waits of 4 s, not a third (the budget allows 3 retries)
    with pytest.raises(ServerUnavailableError, match="HTTP 429 after retries"):
        client.send_transaction(_request(1))
    assert len(responses.calls) == 3


def test_retry_after_is_still_honoured_within_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    retry = FAST.urllib3_retry()
    retry.sleep(HTTPResponse(body=b"", status=503, headers={"Retry-After": "4"}, preload_content=False))
    assert sleeps == [4.0]


@responses.activate(registry=OrderedRegistry)
def test_no_retry_wait_outlasts_the_run_deadline() -> None:
    responses.post(BASE + "/", status=503, headers={"Retry-After": "5"})
    responses.post(BASE + "/", json=_answer(CREATED))
    client = FhirClient(BASE, retry=FAST)
    client.deadline.start(3)
    with pytest.raises(ServerUnavailableError):
        client.send_transaction(_request(1))
    assert len(responses.calls) == 1


# -- server diagnostics: only the known-safe parts, unless the operator asks ------------------------------------------

ECHOES = [
    "HAPI-0450: invalid value Maria Lopez worries about her sugar at night",  # unquoted
    "HAPI-0450: invalid value \u201cMaria Lopez worries\u201d and \u2018night sugar\u2019",  # typographic quotes
    "HAPI-0450: valeur invalide\u00a0: Mar\u00eda L\u00f3pez s'inqui\u00e8te de sa glyc\u00e9mie",  # French
    "HAPI-0450: \u7121\u52b9\u306a\u5024 \u30de\u30ea\u30a2\u30fb\u30ed\u30da\u30b9",  # Japanese
]


@pytest.mark.parametrize("diagnostics", ECHOES)
def test_free_diagnostics_never_reach_the_outcome_summary_by_default(diagnostics: str) -> None:
    body = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "processing", "diagnostics": diagnostics,
         "expression": ["Bundle.entry[2].resource.note[0].text"], "location": ["Maria Lopez"]}]}
    summary = summarize_outcome(body)
    assert summary.text() == summary.codes() == "error/processing HAPI-0450 at Bundle.entry[2].resource.note[0].text"
    for word in ("Maria", "Mar\u00eda", "night", "\u30de\u30ea\u30a2"):
        assert word not in summary.text()


def test_unknown_severities_codes_and_expressions_are_not_passed_through() -> None:
    body = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "Maria", "code": "Lopez", "expression": ["Patient.name.where(family='Lopez')"],
         "details": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/operation-outcome",
                                 "code": "MSG_PARAM_INVALID"}, {"system": "x", "code": "MSG_LOPEZ"}]}}]}
    assert summarize_outcome(body).text() == "unknown/unknown MSG_PARAM_INVALID"


def test_scrubbed_diagnostics_are_kept_only_when_the_operator_asks() -> None:
    body = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": 'HAPI-1821: bad value "Maria" for MRN12345'}]}
    summary = summarize_outcome(body, keep_diagnostics=True)
    assert summary.codes() == "error/invalid HAPI-1821"
    assert summary.text() == "error/invalid HAPI-1821 (HAPI-1821: bad value <value> for <value>)"


@responses.activate
def test_a_duplicate_match_reported_only_in_free_text_still_goes_to_review() -> None:
    responses.post(BASE + "/", status=412, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "processing", "diagnostics": "condition matched multiple resources"}]})
    with pytest.raises(FhirHttpError) as caught:
        FhirClient(BASE, retry=FAST).send_transaction(_request(1))
    assert caught.value.action == "review" and "multiple" not in str(caught.value)
