"""Server limits and per-type permissions: the pure decisions (connector/write/limits.py) alone, then the writer's
paths over `responses` (a server with a bundle limit, one that refuses types, one that refuses everything)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import responses

from connector.errors import AuthError, ExitCode, ServerUnavailableError
from connector.plan.ledger import Ledger, UnitState
from connector.server.capabilities import Capabilities
from connector.write.limits import (
    FailureKind,
    RunLimits,
    classify_failure,
    logical_references,
    next_max_entries,
    permissions_fingerprint,
    refused_by_capabilities,
)
from tests.unit.fhir_answers import BASE, Bundle, Refusal, capability_statement, outcome, sent_transactions
from tests.unit.test_writer import FHIR_JSON, Program, answer_patient_search, refusing, requests_made

MEDPLUM_TOO_MANY = "Transaction requires strict isolation but has too many entries"

# -- classification --------------------------------------------------------------------------------------------


def test_a_413_or_a_too_many_entries_message_is_a_limit_not_bad_data() -> None:
    assert classify_failure(413).kind is FailureKind.LIMIT
    medplum = classify_failure(400, issue_codes=["invalid"], text=MEDPLUM_TOO_MANY)
    assert (medplum.kind, medplum.stated_limit) == (FailureKind.LIMIT, 8)
    stated = classify_failure(400, text="Bundle size exceeds the maximum of 25 entries")
    assert (stated.kind, stated.stated_limit) == (FailureKind.LIMIT, 25)
    assert classify_failure(400, issue_codes=["invalid"], text="HAPI-0450: invalid date").kind is FailureKind.DATA


def test_throttling_is_a_rate_limit_even_as_a_403() -> None:
    assert classify_failure(429).kind is FailureKind.RATE_LIMIT
    assert classify_failure(403, text="Rate limit exceeded for this client").kind is FailureKind.RATE_LIMIT
    assert classify_failure(403, headers={"X-RateLimit-Remaining": "0"}).kind is FailureKind.RATE_LIMIT


def test_a_403_or_405_naming_a_type_refuses_that_type() -> None:
    sent = {"CarePlan", "CareTeam", "Communication", "Provenance"}
    named = classify_failure(403, issue_codes=["forbidden"], text="Writes of CarePlan are not permitted",
                             sent_types=sent)
    assert (named.kind, named.types) == (FailureKind.NOT_PERMITTED, frozenset({"CarePlan"}))
    assert classify_failure(405, text="CareTeam: update not supported", sent_types=sent).types == {"CareTeam"}
    # one written type in the request (its Provenance aside): the refusal is about it
    assert classify_failure(403, sent_types={"Goal", "Provenance"}).types == {"Goal"}
    # several types, none named: not permitted, types unknown (the writer sends them apart)
    unnamed = classify_failure(403, issue_codes=["forbidden"], sent_types=sent)
    assert (unnamed.kind, unnamed.types) == (FailureKind.NOT_PERMITTED, frozenset())
    # a 405 for a whole transaction is the server lacking the operation: as before (78)
    assert classify_failure(405, sent_types=sent).kind is FailureKind.DATA
    assert classify_failure(401, sent_types=sent).kind is FailureKind.AUTH


# -- adaptation ---------------------------------------------------------------------------------------------------


def test_the_bundle_limit_halves_or_takes_the_stated_limit_and_stops_at_the_floor() -> None:
    assert next_max_entries(100, 40, None) == 20
    assert next_max_entries(100, 40, 8) == 7  # one entry kept for the Provenance
    assert next_max_entries(5, 40, None) == 5  # another thread lowered it already
    assert next_max_entries(100, 1, None) is None  # one resource: nothing to cut
    limits = RunLimits(100)
    assert limits.lower(40, 8) == 7 and limits.max_entries == 7
    assert limits.lower(40, 8) == 7  # the same refusal from another thread: no second adaptation
    assert limits.adaptations == ["bundles of at most 8 entries (server limit)"]
    assert (limits.downgrade_strategy(), limits.strategy_downgrade) == ("batch", True)
    assert limits.downgrade_strategy() == "single" and limits.downgrade_strategy() is None


def test_refused_types_and_provenance_refuses_everything() -> None:
    limits = RunLimits(100)
    assert limits.refuse(["CarePlan"], "HTTP 403") == ["CarePlan"] and limits.refuse(["CarePlan"], "x") == []
    assert limits.refused_of(["CarePlan", "CareTeam"]) == ["CarePlan"]
    assert limits.refused_of(["Communication"]) == []
    limits.refuse(["Provenance"], "HTTP 403")
    assert limits.refused_of(["Communication"]) == ["Communication", "Provenance"]
    assert not limits.refused_everything()
    limits.note_forbidden()
    assert limits.refused_everything()
    limits.note_written()
    assert not limits.refused_everything()


def read_only(statement: dict[str, Any], *types: str) -> dict[str, Any]:
    """A statement in which ``types`` declare only read and search (as Epic documents CarePlan and Goal)."""
    for resource in statement["rest"][0]["resource"]:
        if resource["type"] in types:
            resource["interaction"] = [{"code": "read"}, {"code": "search-type"}]
    return statement


def test_the_capability_statement_refuses_types_declared_read_only_or_missing() -> None:
    statement = read_only(capability_statement(), "CarePlan")
    statement["rest"][0]["resource"] = [r for r in statement["rest"][0]["resource"] if r["type"] != "Goal"]
    refused = refused_by_capabilities(Capabilities.parse(statement), ["CarePlan", "Goal", "Communication"])
    assert sorted(refused) == ["CarePlan", "Goal"]
    assert refused_by_capabilities(Capabilities.parse({"resourceType": "CapabilityStatement"}), ["Goal"]) == {}
    assert refused_by_capabilities(None, ["Goal"]) == {}


def test_the_permissions_fingerprint_changes_with_the_statement_and_the_settings() -> None:
    plain = Capabilities.parse(capability_statement())
    changed = Capabilities.parse(read_only(capability_statement(), "CarePlan"))
    assert permissions_fingerprint(plain, ["CarePlan"], "a") == permissions_fingerprint(plain, ["CarePlan"], "a")
    assert permissions_fingerprint(plain, ["CarePlan"], "a") != permissions_fingerprint(changed, ["CarePlan"], "a")
    assert permissions_fingerprint(plain, ["CarePlan"], "a") != permissions_fingerprint(plain, ["CarePlan"], "b")


def test_references_to_parked_types_become_logical_and_the_input_is_not_changed() -> None:
    resource = {"resourceType": "Communication", "subject": {"reference": "Patient/p1"},
                "about": [{"reference": "CarePlan?identifier=https://x/sid/careplan|E1"},
                          {"reference": "Goal?identifier=https://x/sid/goal|G1"}],
                "sender": {"reference": "PractitionerRole?identifier=https://x/sid/role|S1", "display": "Ana"}}
    before = json.dumps(resource)
    out = logical_references(resource, {"CarePlan", "PractitionerRole"})
    assert json.dumps(resource) == before
    assert out["about"][0] == {"type": "CarePlan", "identifier": {"system": "https://x/sid/careplan", "value": "E1"}}
    assert out["about"][1] is resource["about"][1]  # unchanged parts are shared
    assert out["sender"] == {"type": "PractitionerRole", "display": "Ana",
                             "identifier": {"system": "https://x/sid/role", "value": "S1"}}
    assert out["subject"] == {"reference": "Patient/p1"}
    assert logical_references(resource, ()) is resource


# -- the writer ---------------------------------------------------------------------------------------------------


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture
def program(tmp_path: Path) -> Program:
    return Program(tmp_path)


def types_of(bundle: Bundle) -> set[str]:
    return {e["resource"]["resourceType"] for e in bundle["entry"]}


def answer_sync(rsps: responses.RequestsMock, refuse: Any, statement: dict[str, Any] | None = None) -> None:
    rsps.add(responses.GET, f"{BASE}/metadata", body=json.dumps(statement or capability_statement()),
             content_type=FHIR_JSON)
    answer_patient_search(rsps, "MRN1", "p1")
    answer_patient_search(rsps, "MRN2", "p2")
    rsps.add(responses.POST, f"{BASE}/", status=200)  # replaced below
    refusing(rsps, refuse)


def over(entries: int, status: int = 413, text: str = "request entity too large") -> Any:
    def refuse(bundle: Bundle) -> Refusal | None:
        return (status, outcome("invalid", text)) if len(bundle["entry"]) > entries else None
    return refuse


def only(*writable: str, text: str = "Writes of {types} are not permitted for this client") -> Any:
    def refuse(bundle: Bundle) -> Refusal | None:
        forbidden = sorted(types_of(bundle) - set(writable))
        return (403, outcome("forbidden", text.format(types=", ".join(forbidden)))) if forbidden else None
    return refuse


def test_a_bundle_limit_adapts_the_run_and_quarantines_nothing(rsps: responses.RequestsMock,
                                                               program: Program) -> None:
    answer_sync(rsps, over(3))
    summary = program.sync()
    assert (summary.exit_code, summary.counts["quarantined"]) == (0, 0)
    assert summary.counts["created"] == 10
    assert summary.adaptations == ["bundles of at most 3 entries (server limit)"]
    posts = sent_transactions(rsps)
    accepted = [b for b in posts if len(b["entry"]) <= 3]
    assert len(posts) - len(accepted) == 1  # one refusal, then every bundle fits: no bisection
    assert all(b["entry"][-1]["resource"]["resourceType"] == "Provenance" for b in accepted)  # one per change-set


def test_medplum_s_strict_isolation_message_lowers_bundles_to_its_8_entries(rsps: responses.RequestsMock,
                                                                            program: Program) -> None:
    program.write(contacts=[["contact_id", "enrollment_id", "supporter_id", "contact_datetime", "mode",
                             "support_types", "notes", "void"]]
                  + [[f"C{i}", "E1", "S1", f"2026-02-{i:02d} 10:00", "telephone", "emotional", "talked", ""]
                     for i in range(1, 13)])
    answer_sync(rsps, over(8, 400, MEDPLUM_TOO_MANY))
    summary = program.sync()
    assert summary.exit_code == 0 and summary.adaptations == ["bundles of at most 8 entries (server limit)"]
    assert max(len(b["entry"]) for b in sent_transactions(rsps)[2:]) == 8


def test_refused_types_are_parked_and_the_rest_lands_with_logical_references(rsps: responses.RequestsMock,
                                                                             program: Program) -> None:
    answer_sync(rsps, only("Communication", "Provenance"))
    summary = program.sync()
    assert (summary.exit_code, summary.outcome) == (ExitCode.SERVER_REFUSES_TYPES, "partial")
    assert summary.counts["created"] == 6 and summary.counts["not_permitted"] == 4
    assert summary.not_permitted == {"CarePlan": 2, "CareTeam": 2, "Device": 1, "Organization": 1,
                                     "Practitioner": 1, "PractitionerRole": 1}
    assert program.unit_state("enrollment:E1") == UnitState.NOT_PERMITTED
    assert program.unit_state("contact:C1") == UnitState.SENT
    landed = [b for b in sent_transactions(rsps) if types_of(b) <= {"Communication", "Provenance"}]
    references = [json.dumps(e["resource"]) for b in landed for e in b["entry"]]
    for refused in ("CarePlan?", "PractitionerRole?", "Practitioner?", "Organization?", "Device?"):
        assert not any(f'"reference": "{refused}' in r for r in references)
    assert len(sent_transactions(rsps)) == 4  # program-wide refused; E1 refused once; E2 sent without its plan

    # The next run: nothing changed, so the parked records are not sent (only the statement is read).
    rsps.reset()
    rsps.add(responses.GET, f"{BASE}/metadata", body=json.dumps(capability_statement()), content_type=FHIR_JSON)
    again = program.sync()
    assert again.exit_code == ExitCode.SERVER_REFUSES_TYPES and requests_made(rsps) == ["GET /metadata"]
    assert again.counts["not_permitted"] == 4 and again.not_permitted["CarePlan"] == 2


def test_a_changed_statement_or_retry_parked_sends_parked_records_again(rsps: responses.RequestsMock,
                                                                        program: Program) -> None:
    answer_sync(rsps, only("Communication", "Provenance"))
    program.sync()
    rsps.reset()
    answer_sync(rsps, only("Communication", "Provenance", "Organization", "Device", "Practitioner",
                           "PractitionerRole", "CarePlan", "CareTeam"))
    summary = program.sync(retry_parked=True)
    assert summary.exit_code == 0 and summary.counts["not_permitted"] == 0
    assert program.unit_state("enrollment:E1") == UnitState.SENT
    with Ledger(program.ledger) as ledger:
        assert ledger.refused_types()[1] == {}


def test_types_the_statement_declares_read_only_are_parked_without_a_request(rsps: responses.RequestsMock,
                                                                             program: Program) -> None:
    answer_sync(rsps, only("Organization", "Device", "Practitioner", "PractitionerRole", "Communication",
                           "Provenance"), read_only(capability_statement(), "CarePlan"))
    summary = program.sync()
    assert summary.exit_code == ExitCode.SERVER_REFUSES_TYPES
    # CareTeam is sent without its refused CarePlan, and the server refuses it too (this statement allows it)
    assert summary.not_permitted == {"CarePlan": 2, "CareTeam": 2}
    assert not any("CarePlan" in types_of(b) for b in sent_transactions(rsps))
    assert [sorted(types_of(b)) for b in sent_transactions(rsps)][1:] == [
        ["CareTeam", "Communication", "Provenance"],  # E1's and E2's small change-sets shared; refused: CareTeam
        ["Communication", "Provenance"], ["Communication", "Provenance"]]


def test_a_403_for_every_write_is_an_auth_failure_and_parks_nothing(rsps: responses.RequestsMock,
                                                                    program: Program) -> None:
    answer_sync(rsps, only(text="Forbidden"))
    with pytest.raises(AuthError, match="refused every write"):
        program.sync()
    assert program.unit_state("contact:C1") == UnitState.PENDING
    with Ledger(program.ledger) as ledger:
        assert ledger.state_counts().get(UnitState.NOT_PERMITTED, 0) == 0
        assert ledger.runs(1)[0]["exit_code"] == ExitCode.AUTH_FAILED


def test_a_rate_limit_403_leaves_records_pending(rsps: responses.RequestsMock, program: Program) -> None:
    rsps.add(responses.GET, f"{BASE}/metadata", body=json.dumps(capability_statement()), content_type=FHIR_JSON)
    rsps.add(responses.POST, f"{BASE}/", status=403, content_type=FHIR_JSON,
             body=json.dumps(outcome("forbidden", "Rate limit exceeded: too many requests")))
    with pytest.raises(ServerUnavailableError, match="rate limit"):
        program.sync()


def test_a_statement_that_now_allows_a_type_retries_its_parked_records(rsps: responses.RequestsMock,
                                                                       program: Program) -> None:
    answer_sync(rsps, None, read_only(capability_statement(), "CarePlan"))
    assert program.sync().counts["not_permitted"] == 2
    rsps.reset()
    answer_sync(rsps, None)
    rsps.add(responses.GET, f"{BASE}/metadata", body=json.dumps(capability_statement()), content_type=FHIR_JSON)
    summary = program.sync()
    assert (summary.exit_code, summary.counts["not_permitted"]) == (0, 0)
    assert program.unit_state("enrollment:E2") == UnitState.SENT
