"""The demo sync against HAPI behind a proxy that behaves like a restricted EHR (issue 15, "Proof").

For each restriction mode of tests/ehr/restriction_proxy.py, three runs of the same program: the first sync, the
same sync again, and the same sync again with the ledger deleted. After each run, on HAPI directly (not through
the proxy):

* every record the server accepts lands exactly once: the resources per type equal what a clean sync of the
  inputs produces, minus the types the server refuses, and no business identifier (nor change-set Provenance)
  matches more than one resource;
* every reference stored on the server resolves (no ``Type?identifier=`` left as it is, no dangling id);
* the types the server refuses are parked and reported (the ledger state and ``peersync status``);
* the exit code is the documented one (docs/exit-codes.md).

The programs are a slice of the demo (``PARTICIPANTS`` participants without bad rows or review cases), so a run
whose records all land exits 0, and any other code is the restriction's. The proxy's request counts per run are
written to ``.peersync/ehr-restrictions/<mode>.json`` (docs/ehr-restrictions.md quotes them).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from ehr.checks import broken_references, clean_enrollments
from ehr.restriction_proxy import UNRESTRICTED, Restriction, RestrictionProxy, Stats
from reliability.relutil import RelProgram, provenance_duplicates

from connector.cli import main
from connector.errors import ExitCode
from connector.ops.landed import PROGRAM_RESOURCES
from connector.ops.references import check_references
from connector.wiring import build_client

from .syncutil import demo_summary, expected_identities, make_program, server_resources, trim_inputs

pytestmark = pytest.mark.integration

PARTICIPANTS = 5
CONCURRENCY = 4  # relutil's default [sync] concurrency
RESULTS = Path(__file__).resolve().parents[2] / ".peersync" / "ehr-restrictions"
# Clinical-note mode and contact Procedures are off here: DocumentReference and Procedure are neither written nor
# reported as refused.
WRITTEN_TYPES = frozenset(t for t, _, _ in PROGRAM_RESOURCES) - {"DocumentReference", "Procedure"}
ALL_BUT_CARETEAM = (WRITTEN_TYPES - {"CareTeam"}) | {"Provenance"}


@dataclass(frozen=True)
class Case:
    """One restriction, how the program is configured for it, and what the runs must end with."""

    restriction: Restriction
    exit_code: int = ExitCode.OK
    refused_types: frozenset[str] = frozenset()  # types the server never accepts: parked, never on the server
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra config sections


CASES = {
    UNRESTRICTED: Case(Restriction(UNRESTRICTED)),
    "batch-only": Case(Restriction("batch-only")),
    "no-conditional-update": Case(Restriction("no-conditional-update")),
    # R4 has no CapabilityStatement element for "resolves conditional references": the operator says so.
    "no-conditional-references": Case(Restriction("no-conditional-references"),
                                      settings={"server": {"resolves_conditional_references": False}}),
    "only-communication-provenance": Case(Restriction("only-communication-provenance"),
                                          exit_code=getattr(ExitCode, "SERVER_REFUSES_TYPES", 76),
                                          refused_types=WRITTEN_TYPES - {"Communication", "Provenance"}),
    "max-8-entries": Case(Restriction("max-8-entries")),
    # Medplum's refusal names no number: the size must be found by lowering it
    "max-8-entries-unstated": Case(Restriction("max-8-entries", limit_stated=False)),
    "rate-limit": Case(Restriction("rate-limit", rate_every=4)),
    # One type of a two-type record refused (the enrollment's CareTeam, not its CarePlan): the CarePlan, the
    # Goals, requests and contacts referring to it still land
    "careteam-refused": Case(Restriction("only-communication-provenance", writable_types=ALL_BUT_CARETEAM),
                             exit_code=76, refused_types=frozenset({"CareTeam"})),
}
# The same restrictions with the write strategy forced outside a transaction: refused types are learnt from the
# 403s (the CapabilityStatement does not say), the bundle limit from the batch's refusal.
for _strategy in ("batch", "single"):
    CASES[f"only-communication-provenance-{_strategy}"] = Case(
        Restriction("only-communication-provenance", refusal_stated=False), exit_code=76,
        refused_types=WRITTEN_TYPES - {"Communication", "Provenance"},
        settings={"server": {"write_strategy": _strategy}})
    CASES[f"max-8-entries-{_strategy}"] = Case(Restriction("max-8-entries"),
                                               settings={"server": {"write_strategy": _strategy}})
    CASES[f"careteam-refused-{_strategy}"] = Case(
        Restriction("only-communication-provenance", writable_types=ALL_BUT_CARETEAM,
                    refusal_stated=False),
        exit_code=76, refused_types=frozenset({"CareTeam"}), settings={"server": {"write_strategy": _strategy}})


def _program(tmp_path: Path, fhir_base_url: str, proxy: RestrictionProxy, case: Case) -> RelProgram:
    program = make_program(tmp_path, fhir_base_url)
    trim_inputs(program.inputs, clean_enrollments(demo_summary(), PARTICIPANTS))
    rel = RelProgram(program, proxy.base_url, review=frozenset())
    rel.write_config(**case.settings)
    return rel


def _delete_ledger(rel: RelProgram) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{rel.ledger}{suffix}").unlink(missing_ok=True)


def _status(rel: RelProgram) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["status", "--json", "--config", str(rel.config)], prog_name="peersync")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@dataclass
class ServerState:
    """What HAPI itself holds for the program after a run."""

    by_type: Counter[str]
    expected: Counter[str]  # every record the server accepts, once
    duplicates: dict[Any, int]
    provenance_duplicates: dict[str, int]
    broken_references: list[str]  # tests/ehr/checks.py's scan (independent of peersync's code)
    checker_broken: list[str]  # peersync's own checker (connector/ops/references.py, `verify --references`)

    def as_dict(self) -> dict[str, Any]:
        return {"on_server": dict(sorted(self.by_type.items())), "expected": dict(sorted(self.expected.items())),
                "duplicates": len(self.duplicates) + len(self.provenance_duplicates),
                "broken_references": len(self.broken_references), "checker_broken": len(self.checker_broken)}


def _server_state(rel: RelProgram, case: Case) -> ServerState:
    program = rel.program
    found = server_resources(program)
    return ServerState(
        by_type=Counter(k[0] for k in found),
        expected=expected_identities(program, set(), case.refused_types),
        duplicates={k: len(v) for k, v in found.items() if len(v) != 1},
        provenance_duplicates=provenance_duplicates(program),
        broken_references=broken_references(program.base_url, [r for rs in found.values() for r in rs]),
        checker_broken=_checker_broken(rel))


def _checker_broken(rel: RelProgram) -> list[str]:
    """peersync's reference checker, pointed at HAPI itself rather than the proxy."""
    settings = rel.program.settings()
    settings.server.base_url = rel.program.base_url
    report = check_references(build_client(settings), rel.program.context())
    return [f"{b.referrer}.{b.element} -> {b.target}: {b.why}" for b in report.broken]


def _check_server(state: ServerState, run: str) -> None:
    """Every accepted record exactly once, no duplicates, every stored reference resolves."""
    assert not state.duplicates, f"{run}: identifiers matching more than one resource: {state.duplicates}"
    assert not state.provenance_duplicates, f"{run}: change sets with several Provenances: " \
                                            f"{state.provenance_duplicates}"
    assert state.by_type == state.expected, f"{run}: server {dict(state.by_type)} != every accepted record " \
                                            f"once {dict(state.expected)}"
    assert not state.broken_references, f"{run}: {len(state.broken_references)} stored reference(s) do not " \
                                        f"resolve: {state.broken_references[:5]}"
    assert not state.checker_broken, f"{run}: peersync's reference checker: {state.checker_broken[:5]}"


def _check_parked(rel: RelProgram, case: Case) -> None:
    """The refused types are parked in the ledger and shown by ``peersync status``; nothing else waits."""
    status = _status(rel)
    backlog = status["backlog"]
    if not case.refused_types:
        assert backlog.get("not_permitted", 0) == 0 and backlog["pending"] == backlog["quarantined"] == 0, backlog
        return
    assert backlog["pending"] == backlog["quarantined"] == 0, backlog
    assert backlog.get("not_permitted", 0) > 0, f"parked records not reported by status: {backlog}"
    refused = set(status.get("parked", {}).get("refused_types", {}))
    assert refused == case.refused_types, f"status names {sorted(refused)} as refused"


def _record(mode: str, runs: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{mode}.json").write_text(json.dumps({"mode": mode, "participants": PARTICIPANTS, "runs": runs},
                                                     indent=1), encoding="utf-8")


def _run_row(name: str, code: int, summary: Any, stats: Stats, state: ServerState) -> dict[str, Any]:
    return {"run": name, "exit_code": code, "seconds": round(getattr(summary, "duration_s", 0.0), 1),
            "write_requests": getattr(summary, "write_requests", None),
            "counts": dict(getattr(summary, "counts", {}) or {}), "proxy": stats.as_dict(), **state.as_dict()}


@pytest.mark.parametrize("mode", list(CASES))
def test_three_runs_behind_a_restricted_server(mode: str, tmp_path: Path, fhir_base_url: str) -> None:
    case = CASES[mode]
    rows: list[dict[str, Any]] = []
    stats: dict[str, Stats] = {}
    with RestrictionProxy(fhir_base_url, case.restriction) as proxy:
        rel = _program(tmp_path, fhir_base_url, proxy, case)
        for run in ("first", "again", "ledger deleted"):
            if run == "ledger deleted":
                _delete_ledger(rel)
            code, summary = rel.sync_code()
            stats[run] = proxy.take_stats()
            state = _server_state(rel, case)
            rows.append(_run_row(run, code, summary, stats[run], state))
            _record(mode, rows)  # before asserting: the counts of a failing run are worth reading too
            assert code == case.exit_code, f"{run} run: exit {code}, documented {case.exit_code}: {summary}"
            _check_server(state, run)
            _check_parked(rel, case)
            if run == "again":
                assert stats[run].writes == 0, f"an unchanged re-sync sent writes: {stats[run].as_dict()}"
            if case.restriction.mode == "max-8-entries" and case.restriction.limit_stated:
                # A limit adapts the bundle size for the rest of the run (the message states the limit): at most
                # the bundles already in flight are refused (one per writer thread, plus the global units'),
                # never one per bisected half.
                assert stats[run].refused["too-many-entries"] <= CONCURRENCY + 1, stats[run].as_dict()

    first, again = stats["first"], stats["again"]
    if case.refused_types:
        # the parked types are not sent again (the CapabilityStatement did not change)
        assert not [k for k in again.requests if k[0] != "GET" and k[1] in case.refused_types], again.as_dict()
        assert not [k for k in again.entries if k[1] in case.refused_types], again.as_dict()
        assert not again.refused, again.as_dict()
    if mode == "rate-limit":
        assert first.refused["rate-limited"] > 0  # the restriction was exercised
    if case.refused_types and not case.restriction.refusal_stated:
        assert first.refused, "the 403s were not exercised"
    if case.settings.get("server", {}).get("write_strategy") in ("batch", "single"):
        assert first.requests[("POST", "transaction")] == 0, "a transaction sent with the strategy forced"
    if mode == "batch-only":
        assert first.requests[("POST", "transaction")] == 0, "transactions sent to a batch-only server"
