"""Every write strategy against the local HAPI server: the demo sync lands exactly the expected resources, a re-sync
writes nothing, a re-sync after the ledger is lost writes no second copy of anything, and every reference stored on
the server resolves (connector.ops.references). With small transactions (max_bundle_entries = 7) no request is sent
with a reference to something not written yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from connector.ops.references import check_references
from connector.server.client import FhirClient, FhirHttpError
from connector.wiring import build_client
from connector.write.decisions import is_unresolved_reference

from .syncutil import Program, assert_clean_state, demo_summary, make_program

pytestmark = pytest.mark.integration

SUMMARY = demo_summary()
REVIEW = set(SUMMARY["unmatched_enrollments"]) | set(SUMMARY["ambiguous_enrollments"])


@pytest.fixture()
def program(tmp_path: Path, fhir_base_url: str) -> Program:
    return make_program(tmp_path, fhir_base_url)


def broken_references(program: Program) -> list[Any]:
    return check_references(build_client(program.settings()), program.context()).broken


@pytest.mark.parametrize(("strategy", "server_resolves"), [
    ("transaction", True), ("transaction", False), ("batch", True), ("single", True), ("update-as-create", True)])
def test_strategy_lands_once_resyncs_with_nothing_and_repairs_a_lost_ledger(program: Program, strategy: str,
                                                                           server_resolves: bool) -> None:
    # server_resolves False: a transaction whose references peersync resolved to literal Type/id itself
    server = {"write_strategy": strategy, "resolves_conditional_references": server_resolves}
    first = program.sync(server=server)
    assert first.exit_code == 65  # the demo's bad rows and two participants for review
    assert first.counts["pending"] == 0 and first.counts["quarantined"] == 0, first.as_dict()
    assert first.counts["updated"] == 0  # a CarePlan written twice (activities completed) still counts as created
    assert_clean_state(program, REVIEW)
    assert broken_references(program) == []

    again = program.sync(server=server)
    assert again.write_requests == 0
    assert again.counts["created"] == again.counts["updated"] == 0

    Path(program.settings().sync.ledger).unlink()
    lost = program.sync(server=server)
    assert lost.counts["pending"] == 0 and lost.counts["quarantined"] == 0
    assert lost.counts["created"] == 0  # everything found again by identifier (or by its deterministic id)
    assert_clean_state(program, REVIEW)  # duplicates 0: every identifier matches exactly one resource
    assert broken_references(program) == []


def test_small_transactions_never_send_a_referrer_before_its_target(program: Program,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    unresolved: list[int] = []
    send = FhirClient.send_transaction

    def counting(self: FhirClient, bundle: dict[str, Any]) -> Any:
        try:
            return send(self, bundle)
        except FhirHttpError as exc:
            if is_unresolved_reference(exc.status, exc.outcome.text()):
                unresolved.append(exc.status)
            raise

    monkeypatch.setattr(FhirClient, "send_transaction", counting)
    summary = program.sync(server={"write_strategy": "transaction"}, sync={"max_bundle_entries": 7})
    assert unresolved == []
    assert summary.counts["updated"] == 0
    assert summary.counts["pending"] == 0 and summary.counts["quarantined"] == 0
    assert_clean_state(program, REVIEW)
    assert broken_references(program) == []
