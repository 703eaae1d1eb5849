"""Drift on the real HAPI server: a resource deleted, one edited, a CarePlan cascade-deleted. `peersync verify`
reports each exactly, `verify --repair` restores each without duplicates, and a second verify finds nothing."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from connector.identifiers import token_query
from connector.ops.landed import PROGRAM_RESOURCES
from connector.plan.ledger import Ledger, SentResource

from .syncutil import Program, assert_clean_state, demo_summary, make_program

pytestmark = pytest.mark.integration

SUMMARY = demo_summary()
REVIEW = set(SUMMARY["unmatched_enrollments"]) | set(SUMMARY["ambiguous_enrollments"])


def peersync(*args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("PEERSYNC_")}
    clean["PEERSYNC_SECRETS_DIR"] = ""
    return subprocess.run([sys.executable, "-m", "connector.cli", *args], capture_output=True, text=True,
                          env=clean, timeout=300, check=False)


def verify(program: Program, *extra: str) -> tuple[int, dict]:
    result = peersync("verify", "--config", str(program.config), "--json", "-q", *extra)
    return result.returncode, json.loads(result.stdout)


def sent_by_participant(program: Program) -> dict[str | None, list[SentResource]]:
    grouped: dict[str | None, list[SentResource]] = {}
    with Ledger(program.root / "state" / "ledger.sqlite") as ledger:
        for resource in ledger.sent_resources():
            unit = ledger.unit(resource.unit_key)
            grouped.setdefault(unit.participant if unit else None, []).append(resource)
    return grouped


def gone(base_url: str, resources: list[SentResource]) -> set[tuple[str, str]]:
    """The test's own oracle: which of these resources the server no longer has (read one by one)."""
    return {(r.resource_type, r.server_id or "") for r in resources
            if requests.get(f"{base_url}/{r.resource_type}/{r.server_id}", timeout=60).status_code in (404, 410)}


def keep_first_enrollments(program: Program, n: int) -> None:
    """Cut the program's inputs down to its first ``n`` enrollments and their records."""
    def rewrite(name: str, keep: Callable[[dict[str, str]], bool]) -> list[dict[str, str]]:
        path = program.inputs / name
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields, rows = reader.fieldnames or [], [row for row in reader if keep(row)]
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        return rows

    enrollments = {row["enrollment_id"] for row in rewrite("enrollments.csv", lambda _row: True)[:n]}
    rewrite("enrollments.csv", lambda row: row["enrollment_id"] in enrollments)
    goals = {row["goal_id"] for row in rewrite("goals.csv", lambda row: row["enrollment_id"] in enrollments)}
    rewrite("goal_notes.csv", lambda row: row["goal_id"] in goals)
    for name in ("contacts.csv", "planned_contacts.csv", "referrals.csv"):
        rewrite(name, lambda row: row["enrollment_id"] in enrollments)


def delete(base_url: str, resource_type: str, server_id: str) -> None:
    # Cascade: the Provenance peersync wrote references every resource, and HAPI enforces referential integrity.
    response = requests.delete(f"{base_url}/{resource_type}/{server_id}?_cascade=delete", timeout=120)
    assert response.status_code == 200, response.text[:300]


def test_verify_reports_each_drift_exactly_and_repair_restores_it(tmp_path: Path, fhir_base_url: str) -> None:
    program = make_program(tmp_path, fhir_base_url)
    assert program.sync().exit_code == 65  # the demo has bad rows and participants for review
    code, clean = verify(program)
    assert code == 0 and clean["verify"]["totals"]["changed"] == clean["verify"]["totals"]["missing"] == 0
    assert clean["verify"]["requests"] < clean["verify"]["totals"]["identical"] / 20  # batched, not one by one

    grouped = sent_by_participant(program)
    participants = sorted(p for p in grouped if p and any(r.resource_type == "CarePlan" for r in grouped[p])
                          and any(r.resource_type == "Goal" for r in grouped[p])
                          and any(r.resource_type == "Communication" for r in grouped[p]))
    cascade_p, delete_p, edit_p = participants[:3]
    careplan = next(r for r in grouped[cascade_p] if r.resource_type == "CarePlan")
    contact = next(r for r in grouped[delete_p] if r.resource_type == "Communication")
    goal = next(r for r in grouped[edit_p] if r.resource_type == "Goal")

    delete(fhir_base_url, "Communication", contact.server_id or "")
    delete(fhir_base_url, "CarePlan", careplan.server_id or "")
    original = requests.get(f"{fhir_base_url}/Goal/{goal.server_id}", timeout=60).json()
    edited = dict(original, lifecycleStatus="cancelled" if original["lifecycleStatus"] != "cancelled" else "active")
    assert requests.put(f"{fhir_base_url}/Goal/{goal.server_id}", json=edited, timeout=60).status_code == 200

    expected_missing = gone(fhir_base_url, grouped[cascade_p] + grouped[delete_p])
    assert ("Communication", contact.server_id) in expected_missing and ("CarePlan", careplan.server_id) in \
        expected_missing and len(expected_missing) > 2  # the cascade took the CarePlan's requests with it
    code, drifted = verify(program)
    assert code == 65
    found = {(d["resource_type"], d["server_id"]): d["drift"] for d in drifted["verify"]["drifted"]}
    assert found == {**{key: "missing" for key in expected_missing}, ("Goal", goal.server_id): "changed"}
    assert drifted["verify"]["resources"]["Goal"]["changed"] == 1

    code, repaired = verify(program, "--repair")
    assert code == 65  # the repair sync's own exit: the demo's review cases are still there
    assert repaired["repair"]["marked"] == len(drifted["verify"]["drifted_units"])
    assert repaired["repair"]["counts"]["pending"] == repaired["repair"]["counts"]["quarantined"] == 0

    code, after = verify(program)
    assert code == 0, after["verify"]["drifted"]
    identical = clean["verify"]["totals"]["identical"]
    assert after["verify"]["totals"] == {"identical": identical, "changed": 0, "missing": 0}
    found_after = assert_clean_state(program, REVIEW)  # every identifier once: no duplicates; counts as expected
    restored = next(r for r in found_after[("Goal", f"goal|{goal.value}")])
    assert restored["lifecycleStatus"] == original["lifecycleStatus"]


def test_doctor_fails_after_the_server_lost_the_programs_resources(tmp_path: Path, fhir_base_url: str) -> None:
    program = make_program(tmp_path, fhir_base_url)
    keep_first_enrollments(program, 3)  # a small program: deleting it from the server stays quick
    program.sync()
    assert json.loads(peersync("doctor", "--config", str(program.config), "--json").stdout)["exit_code"] == 0
    ctx = program.context()
    for resource_type, kind, _ in PROGRAM_RESOURCES:  # as a refreshed test EHR: the program's resources are gone
        query = f"identifier={token_query(ctx.system(kind), '')}&_cascade=delete"
        response = requests.delete(f"{fhir_base_url}/{resource_type}?{query}", timeout=300)
        assert response.status_code in (200, 204), response.text[:300]
    result = peersync("doctor", "--config", str(program.config), "--json")
    check = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "ledger.server")
    assert check["status"] == "fail" and "peersync verify --repair" in check["fix"]
    assert result.returncode == 65
