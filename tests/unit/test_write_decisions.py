"""The write stage's pure decisions: chunking, bisection, deferral, the write plan, change-sets, the exit policy."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from connector.errors import ExitCode
from connector.map import MappingContext
from connector.run import exit_for
from connector.server.capabilities import Capabilities
from connector.server.client import Action
from connector.write.bundle import PendingWrite, UnitWrite
from connector.write.changeset import (
    build_change_set,
    change_set_code,
    units_change_set,
    void_bundle,
    void_change_set,
)
from connector.write.decisions import (
    CONDITIONAL_EVERYWHERE,
    FailureStep,
    chunk_writes,
    halves,
    is_unresolved_reference,
    step_after_failure,
    write_plan,
)
from tests.unit.fhir_answers import capability_statement

CTX = MappingContext(program_id="demo", program_name="Demo", base_url="https://p.example", mrn_system="urn:mrn")
NOW = datetime(2026, 7, 1, tzinfo=UTC)


def unit(key: str, resources: int = 1, *, voided: bool = False, unit_hash: str | None = "h") -> PendingWrite:
    kind, _, source_id = key.partition(":")
    resources_ = [{"resourceType": "Communication",
                   "identifier": [{"system": f"https://p.example/{kind}", "value": f"{source_id}-{i}"}],
                   "subject": {"reference": "Patient?identifier=urn:mrn|M1"}} for i in range(resources)]
    return PendingWrite(UnitWrite(key, kind, resources_, voided=voided), unit_hash)


# -- chunking ---------------------------------------------------------------------------------------------------------


def test_chunks_hold_at_most_the_limit_and_keep_the_order() -> None:
    writes = [unit(f"contact:C{i}", size) for i, size in enumerate([2, 1, 1, 3, 1])]
    chunks = list(chunk_writes(writes, 4))
    assert [[w.unit.unit_key for w in c] for c in chunks] == [["contact:C0", "contact:C1", "contact:C2"],
                                                              ["contact:C3", "contact:C4"]]
    assert all(sum(w.size for w in c) <= 4 for c in chunks)


def test_a_unit_larger_than_the_limit_travels_alone_and_nothing_is_empty() -> None:
    assert [len(c) for c in chunk_writes([unit("a:1"), unit("a:2", 5), unit("a:3")], 2)] == [1, 1, 1]
    assert list(chunk_writes([], 100)) == []


def test_chunking_is_lazy() -> None:
    def endless() -> object:
        i = 0
        while True:
            i += 1
            yield unit(f"a:{i}")

    first = next(chunk_writes(endless(), 3))  # type: ignore[arg-type]
    assert len(first) == 3


# -- failures ---------------------------------------------------------------------------------------------------------


def test_halves_split_in_the_middle() -> None:
    assert halves([1, 2, 3, 4, 5]) == ([1, 2], [3, 4, 5])
    assert halves([1]) == ([], [1])


@pytest.mark.parametrize(("action", "units", "unresolved", "can_defer", "step"), [
    (Action.ISOLATE, 2, False, True, FailureStep.SPLIT),
    (Action.REVIEW, 3, False, False, FailureStep.SPLIT),
    (Action.CONFLICT, 2, True, True, FailureStep.SPLIT),
    (Action.ISOLATE, 1, True, True, FailureStep.DEFER),
    (Action.ISOLATE, 1, True, False, FailureStep.RECORD),  # the deferred pass itself: quarantine
    (Action.ISOLATE, 1, False, True, FailureStep.RECORD),
    (Action.REVIEW, 1, False, True, FailureStep.RECORD),
    (Action.FATAL, 5, False, True, FailureStep.STOP),  # never split: the server cannot do it at all
    (Action.RETRY_LATER, 4, False, True, FailureStep.RECORD),
])
def test_the_step_after_a_failed_transaction(action: Action, units: int, unresolved: bool, can_defer: bool,
                                             step: FailureStep) -> None:
    assert step_after_failure(action, units=units, unresolved_reference=unresolved, can_defer=can_defer) is step


def test_unresolved_references_are_told_by_status_or_hapi_code() -> None:
    assert is_unresolved_reference(404, "")
    assert is_unresolved_reference(400, "error/processing: HAPI-1091: Invalid match URL")
    assert is_unresolved_reference(400, "error/processing: HAPI-1094: Resource Goal/x not found")
    assert not is_unresolved_reference(422, "error/processing: HAPI-0450: bad element")


# -- capabilities and the write plan ----------------------------------------------------------------------------------


def test_capabilities_are_parsed_from_the_first_server_rest() -> None:
    statement = capability_statement()
    statement["software"] = {"name": "HAPI FHIR Server", "version": "8.0.0"}
    statement["rest"].insert(0, {"mode": "client", "interaction": [{"code": "batch"}]})
    caps = Capabilities.parse(statement)
    assert (caps.fhir_version, caps.software) == ("4.0.1", "HAPI FHIR Server 8.0.0")
    assert caps.supports_transaction and not caps.supports_batch
    assert "Goal" in caps.conditional_update_types() and "Provenance" not in caps.conditional_update_types()
    goal = caps.resource("Goal")
    assert goal is not None and goal.search_params is None and goal.interactions == frozenset()
    assert caps.resource("Basic") is None and caps.conditional_create("Basic")  # not listed: assumed


def test_a_malformed_statement_reads_as_declaring_nothing() -> None:
    caps = Capabilities.parse({"resourceType": "CapabilityStatement", "rest": "nope", "software": "x"})
    assert caps == Capabilities()


def test_write_plan_conditional_everywhere_without_a_statement_or_when_configured() -> None:
    caps = Capabilities.parse(capability_statement(conditional_update=False))
    assert write_plan("conditional", caps, ["Goal"]) is CONDITIONAL_EVERYWHERE
    assert write_plan("auto", None, ["Goal"]) is CONDITIONAL_EVERYWHERE
    assert CONDITIONAL_EVERYWHERE.uses_conditional("Goal") and CONDITIONAL_EVERYWHERE.provenance_conditional_create


def test_write_plan_auto_falls_back_per_type() -> None:
    statement = capability_statement()
    for resource in statement["rest"][0]["resource"]:
        if resource["type"] == "Task":
            resource["conditionalUpdate"] = False
    plan = write_plan("auto", Capabilities.parse(statement), ["Goal", "Task"])
    assert plan.uses_conditional("Goal") and not plan.uses_conditional("Task")
    assert plan.search_types == ("Task",) and plan.transaction_declared and plan.provenance_conditional_create


def test_write_plan_search_mode_and_provenance_without_conditional_create() -> None:
    caps = Capabilities.parse(capability_statement(provenance_conditional_create=False, transaction=False))
    plan = write_plan("search", caps, ["Goal", "Task"])
    assert not plan.uses_conditional("Goal") and plan.search_types == ("Goal", "Task")
    assert not plan.provenance_conditional_create and not plan.transaction_declared


# -- change-sets ------------------------------------------------------------------------------------------------------


def test_a_change_set_code_depends_on_the_units_and_hashes_not_their_order() -> None:
    a, b = unit("contact:C1"), unit("contact:C2")
    assert units_change_set([a, b]) == units_change_set([b, a])
    assert units_change_set([a, b]) != units_change_set([a, unit("contact:C2", unit_hash="other")])
    assert void_change_set("contact:C1", ["Communication/1"]) != units_change_set([a])


def test_the_change_set_bundle_ends_with_a_tagged_conditional_provenance() -> None:
    built = build_change_set([unit("contact:C1", 2)], ctx=CTX, patient=None, resolve=lambda _i: None,
                             recorded=NOW)
    *resources, provenance = built.bundle["entry"]
    assert len(resources) == 2 and built.has_provenance
    tag = provenance["resource"]["meta"]["tag"][0]
    # the resources name no supporter: one Provenance, by the program, tagged with its own change-set code
    code = change_set_code([units_change_set([unit("contact:C1", 2)]), "program", "UPDATE"])
    assert tag == {"system": f"{CTX.meta_source}/change-set", "code": code}
    assert provenance["request"]["ifNoneExist"].endswith("%7C" + tag["code"])
    assert provenance["resource"]["target"] == [{"reference": e["fullUrl"]} for e in resources]
    assert provenance["resource"]["activity"]["coding"][0]["code"] == "UPDATE"
    plain = build_change_set([unit("contact:C1", voided=True)], ctx=CTX, patient=None, resolve=lambda _i: None,
                             recorded=NOW, conditional_provenance=False)
    assert "ifNoneExist" not in plain.bundle["entry"][-1]["request"]
    assert plain.bundle["entry"][-1]["resource"]["activity"]["coding"][0]["code"] == "NULLIFY"


def test_a_void_bundle_sets_entered_in_error_and_posts_a_conditional_provenance() -> None:
    current = [{"resourceType": "Communication", "id": "7", "status": "completed", "meta": {"versionId": "3"}},
               {"resourceType": "Organization", "id": "9"}]  # no status to set: left alone
    bundle = void_bundle("contact:C1", current, ctx=CTX, recorded=NOW)
    assert bundle is not None
    put, provenance = bundle["entry"]
    assert put["request"] == {"method": "PUT", "url": "Communication/7"}
    assert put["resource"]["status"] == "entered-in-error" and "meta" not in put["resource"]
    assert "Entered in error" in put["resource"]["text"]["div"]  # the chart stops showing it as current
    assert current[0]["status"] == "completed"  # the resource as read is not changed
    code = void_change_set("contact:C1", ["Communication/7"])
    assert provenance["resource"]["meta"]["tag"][0]["code"] == code
    assert provenance["request"]["ifNoneExist"].endswith("%7C" + code)
    assert void_bundle("contact:C1", current[1:], ctx=CTX, recorded=NOW) is None


# -- the exit policy --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("counts", "expected"), [
    ({}, (int(ExitCode.OK), "ok")),
    ({"created": 5, "unchanged": 3, "skipped_quarantined": 2}, (int(ExitCode.OK), "ok")),
    ({"rejected": 1}, (int(ExitCode.RECORDS_REJECTED), "partial")),
    ({"in_review": 1}, (int(ExitCode.RECORDS_REJECTED), "partial")),
    ({"quarantined": 1}, (int(ExitCode.RECORDS_REJECTED), "partial")),
    ({"pending": 1}, (int(ExitCode.SERVER_UNAVAILABLE), "incomplete")),
    ({"pending": 1, "rejected": 4, "quarantined": 1}, (int(ExitCode.SERVER_UNAVAILABLE), "incomplete")),
])
def test_exit_policy(counts: dict[str, int], expected: tuple[int, str]) -> None:
    assert exit_for(Counter(counts)) == expected
