"""The writer's paths against an in-memory FHIR server (tests/unit/fakefhir.py): what lands, what is split,
deferred, quarantined, voided, moved or left pending, and what the ledger says afterwards."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import responses

from connector.errors import ExitCode, ServerUnavailableError
from connector.map import MappingContext
from connector.plan.ledger import Ledger, UnitState
from connector.read.profile import load_profile
from connector.run import RunSummary, Syncer, SyncOptions
from connector.server.client import FhirClient, FhirHttpError, RetryPolicy
from tests.unit.fakefhir import BASE, FakeFhir, capability_statement, outcome

PROFILE = load_profile("peersync-template")
FAST = RetryPolicy(attempts=0, backoff_factor=0.0, backoff_max=0.0, jitter=0.0, retry_after_cap=0.0)
CLOCK = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)

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
        return SyncOptions(profile=PROFILE, inputs=[self.inputs], ledger_path=self.ledger,
                           ctx=MappingContext.from_profile(PROFILE), rejects_dir=self.root / "rejects", **values)

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
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def program(tmp_path: Path) -> Program:
    return Program(tmp_path)


def communications_with(bundle: dict[str, Any], contact_id: str) -> bool:
    return any(e["resource"]["resourceType"] == "Communication"
               and e["resource"]["identifier"][0]["value"].endswith(contact_id) for e in bundle["entry"])


def test_a_first_sync_creates_everything_in_one_transaction_per_participant(rsps: responses.RequestsMock,
                                                                            program: Program) -> None:
    fake = FakeFhir(rsps, patients={"MRN1": "p1", "MRN2": "p2"})
    summary = program.sync()
    assert (summary.exit_code, summary.outcome) == (0, "ok")
    assert summary.counts["created"] == 1 + 1 + 2 + 6  # program, supporter, 2 enrollments, 6 contacts
    assert len(fake.transactions) == 3  # program-wide, E1, E2
    assert len(fake.of_type("Communication")) == 6 and len(fake.of_type("Provenance")) == 3
    assert {c["subject"]["reference"] for c in fake.of_type("Communication")} == {"Patient/p1", "Patient/p2"}
    assert program.sync().counts["unchanged"] == 10 and len(fake.transactions) == 3  # nothing to send


def test_a_rejected_unit_is_isolated_by_bisection_and_the_rest_lands(rsps: responses.RequestsMock,
                                                                     program: Program) -> None:
    fake = FakeFhir(rsps, patients={"MRN1": "p1", "MRN2": "p2"})
    fake.fail = lambda bundle: (422, outcome("processing", "HAPI-0450: bad element")) \
        if communications_with(bundle, "C3") else None
    summary = program.sync()
    assert (summary.exit_code, summary.outcome) == (int(ExitCode.RECORDS_REJECTED), "partial")
    assert summary.counts["quarantined"] == 1 and summary.counts["created"] == 9
    assert program.unit_state("contact:C3") == UnitState.QUARANTINED
    assert program.unit_state("contact:C1") == UnitState.SENT
    # E1's units: the enrollment (CarePlan, CareTeam), C1, C3, C5. Split into [enrollment, C1] and [C3, C5], then
    # [C3] and [C5]: resources per transaction, the Provenance aside.
    e1 = [b for b in fake.transactions if b["entry"][0]["resource"]["resourceType"] in ("CarePlan", "Communication")
          and not communications_with(b, "C2")]
    assert [len(b["entry"]) - 1 for b in e1] == [5, 3, 2, 1, 1]


def test_a_unit_failing_only_on_an_unresolved_reference_is_deferred_then_lands(rsps: responses.RequestsMock,
                                                                               program: Program) -> None:
    fake = FakeFhir(rsps, patients={"MRN1": "p1", "MRN2": "p2"})
    refused: list[int] = []

    def unresolved_once(bundle: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        if communications_with(bundle, "C5") and not refused:
            refused.append(1)
            return 400, outcome("processing", "HAPI-1091: Invalid match URL: no resources match")
        return None

    fake.fail = unresolved_once
    summary = program.sync(max_bundle_entries=1)  # every unit in its own transaction
    assert (summary.exit_code, summary.counts["quarantined"]) == (0, 0)
    assert program.unit_state("contact:C5") == UnitState.SENT
    c5 = [b for b in fake.transactions if communications_with(b, "C5")]
    assert len(c5) == 2 and fake.transactions[-1] is not c5[0]  # sent again after E1's other units


def test_an_unresolved_reference_in_the_deferred_pass_is_quarantined(rsps: responses.RequestsMock,
                                                                     program: Program) -> None:
    fake = FakeFhir(rsps, patients={"MRN1": "p1", "MRN2": "p2"})
    fake.fail = lambda bundle: (400, outcome("processing", "HAPI-1094: Resource Goal/x not found")) \
        if communications_with(bundle, "C5") else None
    summary = program.sync(max_bundle_entries=1)
    assert summary.counts["quarantined"] == 1
    assert len([b for b in fake.transactions if communications_with(b, "C5")]) == 2  # sent, deferred, quarantined
    assert program.unit_state("contact:C5") == UnitState.QUARANTINED


def test_a_server_that_cannot_take_transactions_ends_the_run(rsps: responses.RequestsMock,
                                                             program: Program) -> None:
    fake = FakeFhir(rsps, patients={"MRN1": "p1", "MRN2": "p2"})
    fake.fail = lambda bundle: (405, outcome("not-supported", "transactions are disabled"))
    with pytest.raises(FhirHttpError):
        program.sync()
    assert program.unit_state("program:" + MappingContext.from_profile(PROFILE).program_id) == UnitState.QUARANTINED


def test_a_participant_without_a_patient_goes_to_review(rsps: responses.RequestsMock, program: Program) -> None:
    fake = FakeFhir(rsps, patients={"MRN1": "p1"})
    summary = program.sync()
    assert (summary.exit_code, summary.counts["in_review"]) == (int(ExitCode.RECORDS_REJECTED), 4)  # E2 + 3 contacts
    assert program.unit_state("contact:C2") == UnitState.REVIEW
    with Ledger(program.ledger) as ledger:
        assert [r["reason"] for r in ledger.reviews()] == ["patient-not-found"]
    assert not any(communications_with(b, "C2") for b in fake.transactions)


def test_a_server_that_goes_down_leaves_the_rest_pending(rsps: responses.RequestsMock, program: Program) -> None:
    fake = FakeFhir(rsps, patients={"MRN1": "p1", "MRN2": "p2"})

    def down_after_first_participant(bundle: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        if any(e["resource"]["resourceType"] == "Communication" for e in bundle["entry"]):
            fake.down = True  # this transaction lands; every request after it gets 503
        return None

    fake.fail = down_after_first_participant
    with pytest.raises(ServerUnavailableError):
        program.sync()
    assert program.unit_state("contact:C1") == UnitState.SENT and program.unit_state("contact:C2") == UnitState.PENDING
    with Ledger(program.ledger) as ledger:
        (run,) = ledger.runs()
    assert run["exit_code"] == int(ExitCode.SERVER_UNAVAILABLE)
    fake.down, fake.fail = False, None
    summary = program.sync()
    assert summary.exit_code == 0 and summary.counts["retried"] == 4  # E2, C2, C4, C6
    assert len(fake.of_type("Communication")) == 6


def void_transactions(fake: FakeFhir) -> list[dict[str, Any]]:
    return [b for b in fake.transactions if any(e["request"]["url"].startswith("Communication/") for e in b["entry"])]


def test_a_record_gone_from_the_input_is_voided_with_one_provenance_even_when_the_answer_is_lost(
        rsps: responses.RequestsMock, program: Program) -> None:
    fake = FakeFhir(rsps, patients={"MRN1": "p1", "MRN2": "p2"})
    program.sync()
    program.write(contacts=contacts([2, 3, 4, 5, 6]))  # C1 removed (1 of 6: under max_delete_fraction)

    def commit_then_lose_the_answer(bundle: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        if bundle in void_transactions(fake):
            for entry in bundle["entry"]:
                fake._entry(entry)  # the server commits...
            fake.fail = None
            return 502, outcome("transient", "bad gateway")  # ...and the answer never arrives
        return None

    fake.fail = commit_then_lose_the_answer
    with pytest.raises(ServerUnavailableError):
        program.sync()
    summary = program.sync()  # the void is sent again; its Provenance finds the first one
    assert summary.counts["deleted"] == 1 and summary.exit_code == 0
    first, again = void_transactions(fake)
    assert first == again  # the same change-set, the same condition
    provenance = first["entry"][-1]
    assert provenance["request"]["ifNoneExist"].startswith("_tag=")
    assert provenance["resource"]["activity"]["coding"][0]["code"] == "NULLIFY"
    tag = provenance["resource"]["meta"]["tag"][0]["code"]
    assert len([p for p in fake.of_type("Provenance") if p["meta"]["tag"][0]["code"] == tag]) == 1
    voided = [c for c in fake.of_type("Communication") if c["identifier"][0]["value"].endswith("C1")]
    assert [c["status"] for c in voided] == ["entered-in-error"]
    assert program.unit_state("contact:C1") == UnitState.SENT
    with Ledger(program.ledger) as ledger:
        assert ledger.unit("contact:C1").voided  # type: ignore[union-attr]


def test_a_void_the_server_refuses_is_quarantined(rsps: responses.RequestsMock, program: Program) -> None:
    fake = FakeFhir(rsps, patients={"MRN1": "p1", "MRN2": "p2"})
    program.sync()
    program.write(contacts=contacts([2, 3, 4, 5, 6]))
    fake.fail = lambda bundle: (422, outcome("processing", "HAPI-0450: refused")) \
        if bundle in void_transactions(fake) else None
    summary = program.sync()
    assert summary.counts["quarantined"] == 1 and program.unit_state("contact:C1") == UnitState.QUARANTINED


def test_a_record_moved_to_another_patient_retires_the_old_resources(rsps: responses.RequestsMock,
                                                                     program: Program) -> None:
    fake = FakeFhir(rsps, patients={"MRN1": "p1", "MRN2": "p2", "MRN9": "p9"})
    program.sync()
    program.write(contacts=contacts([1, 2, 3, 4, 5, 6]), mrns={"E1": "MRN9", "E2": "MRN2"})
    summary = program.sync()
    assert summary.exit_code == 0
    c1 = [c for c in fake.of_type("Communication") if c["identifier"][0]["value"].endswith("C1")]
    old, new = sorted(c1, key=lambda c: c["subject"]["reference"])
    assert (old["subject"]["reference"], old["status"]) == ("Patient/p1", "entered-in-error")
    assert "retired" in old["identifier"][0]["system"]
    assert new["subject"]["reference"] == "Patient/p9" and new["status"] != "entered-in-error"


def test_without_conditional_update_the_writer_searches_then_writes_by_id(rsps: responses.RequestsMock,
                                                                          program: Program) -> None:
    fake = FakeFhir(rsps, patients={"MRN1": "p1", "MRN2": "p2"},
                    statement=capability_statement(conditional_update=False))
    assert program.sync().counts["created"] == 10
    assert {e["request"]["method"] for b in fake.transactions for e in b["entry"]} == {"POST"}
    program.write(contacts=contacts([1, 2, 3, 4, 5, 6], note="edited"))
    fake.transactions.clear()
    summary = program.sync()
    assert summary.counts["updated"] == 6
    methods = {(e["resource"]["resourceType"], e["request"]["method"]) for b in fake.transactions for e in b["entry"]}
    assert ("Communication", "PUT") in methods and ("Communication", "POST") not in methods
    assert len(fake.of_type("Communication")) == 6  # found by identifier: no duplicates


def test_a_server_without_conditional_create_on_provenance_gets_a_plain_post(rsps: responses.RequestsMock,
                                                                              program: Program) -> None:
    fake = FakeFhir(rsps, patients={"MRN1": "p1", "MRN2": "p2"},
                    statement=capability_statement(provenance_conditional_create=False))
    program.sync()
    provenance_requests = [b["entry"][-1]["request"] for b in fake.transactions]
    assert provenance_requests and all("ifNoneExist" not in r for r in provenance_requests)


def test_write_mode_conditional_does_not_read_the_capability_statement(rsps: responses.RequestsMock,
                                                                       program: Program) -> None:
    FakeFhir(rsps, patients={"MRN1": "p1", "MRN2": "p2"}, statement=capability_statement(conditional_update=False))
    assert program.sync(write_mode="conditional").exit_code == 0
    assert not [c for c in rsps.calls if c.request.url.endswith("/metadata")]
