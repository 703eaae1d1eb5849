"""Server drift: someone else deletes a resource on the server, edits one, or cascade-deletes a CarePlan (its
requests go with it). `peersync verify` reports each exactly (checked against the test's own read-back of the
server), `verify --repair` restores each without duplicates, and a second verify finds everything identical.

At the end the invariant holds (tests/reliability/relutil.py: check_invariant): every identifier once,
Provenance included; nothing lost; the same content as a clean sync of the same inputs (so the edit is undone)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import requests

from connector.ops.landed import PROGRAM_RESOURCES
from connector.plan.ledger import Ledger, SentResource

from .relutil import DONE_CODES, RelProgram, assert_no_traceback, check_invariant, normalized_content, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

PARTICIPANTS = 6
Drifted = dict[tuple[str, str], str]  # (resource type, server id) -> "missing" / "changed"
SentByParticipant = dict[str | None, list[SentResource]]


def verify(rel: RelProgram, *extra: str) -> tuple[int, dict[str, Any]]:
    """`peersync verify --json` as a subprocess: (exit code, its JSON)."""
    proc = run_cli("verify", "--config", str(rel.config), "--json", "-q", *extra, timeout=600)
    assert_no_traceback(proc)
    return proc.returncode, json.loads(proc.stdout)


def sent_by_participant(rel: RelProgram) -> SentByParticipant:
    """What the ledger says the server confirmed, grouped by participant (None: program-wide units)."""
    grouped: SentByParticipant = {}
    with Ledger(rel.ledger) as ledger:
        for resource in ledger.sent_resources():
            unit = ledger.unit(resource.unit_key)
            grouped.setdefault(unit.participant if unit else None, []).append(resource)
    return grouped


def participant_with(grouped: SentByParticipant, resource_type: str) -> str:
    """The first participant (sorted) with a confirmed resource of this type."""
    return sorted(p for p, resources in grouped.items()
                  if p and any(r.resource_type == resource_type for r in resources))[0]


def gone(base_url: str, resources: list[SentResource]) -> Drifted:
    """The test's own oracle: which of these resources the server no longer has (read one by one)."""
    return {(r.resource_type, r.server_id or ""): "missing" for r in resources
            if requests.get(f"{base_url}/{r.resource_type}/{r.server_id}", timeout=60).status_code in (404, 410)}


def delete_cascade(base_url: str, resource_type: str, server_id: str) -> None:
    # Cascade: the Provenance peersync wrote references every resource, and HAPI enforces referential integrity.
    response = requests.delete(f"{base_url}/{resource_type}/{server_id}?_cascade=delete", timeout=120)
    assert response.status_code == 200, response.text[:300]


def delete_a_contact(base_url: str, grouped: SentByParticipant) -> Drifted:
    participant = participant_with(grouped, "Communication")
    contact = next(r for r in grouped[participant] if r.resource_type == "Communication")
    delete_cascade(base_url, "Communication", contact.server_id or "")
    drifted = gone(base_url, grouped[participant])
    assert ("Communication", contact.server_id) in drifted
    return drifted


def edit_a_goal(base_url: str, grouped: SentByParticipant) -> Drifted:
    goal = next(r for r in grouped[participant_with(grouped, "Goal")] if r.resource_type == "Goal")
    original = requests.get(f"{base_url}/Goal/{goal.server_id}", timeout=60).json()
    edited = dict(original, lifecycleStatus="cancelled" if original["lifecycleStatus"] != "cancelled" else "active")
    assert requests.put(f"{base_url}/Goal/{goal.server_id}", json=edited, timeout=60).status_code == 200
    return {("Goal", goal.server_id or ""): "changed"}


def cascade_delete_a_careplan(base_url: str, grouped: SentByParticipant) -> Drifted:
    participant = participant_with(grouped, "CarePlan")
    careplan = next(r for r in grouped[participant] if r.resource_type == "CarePlan")
    delete_cascade(base_url, "CarePlan", careplan.server_id or "")
    drifted = gone(base_url, grouped[participant])
    assert ("CarePlan", careplan.server_id) in drifted and len(drifted) > 1, drifted  # its requests went too
    return drifted


SCENARIOS: dict[str, tuple[str, Callable[[str, SentByParticipant], Drifted]]] = {
    "drift-deleted": ("A Communication deleted on the server (and the Provenance that cites it)", delete_a_contact),
    "drift-edited": ("A Goal edited on the server (lifecycleStatus changed, a new version)", edit_a_goal),
    "drift-careplan-cascade": ("A CarePlan cascade-deleted on the server (with what references it)",
                               cascade_delete_a_careplan),
}


def identities(rel: RelProgram, grouped: SentByParticipant, drifted: Drifted) -> set[tuple[str, str]]:
    """The business identities (normalised as in relutil.normalized_content) of the drifted resources."""
    ctx = rel.program.context()
    kind_of = {ctx.system(kind): kind for _, kind, _ in PROGRAM_RESOURCES}
    return {(r.resource_type, f"{kind_of[r.system]}|{r.value}".replace(rel.program.program_id, "<program>"))
            for resources in grouped.values() for r in resources if (r.resource_type, r.server_id) in drifted}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_verify_reports_drift_exactly_and_repair_restores_it(name: str, program_factory: Callable[..., RelProgram],
                                                             references, record) -> None:
    title, inflict = SCENARIOS[name]
    rel = program_factory(name, participants=PARTICIPANTS)
    first_code, first = rel.sync_code()
    assert first_code in DONE_CODES, first
    code, clean = verify(rel)
    identical = clean["verify"]["totals"]["identical"]
    assert code == 0 and clean["verify"]["totals"] == {"identical": identical, "changed": 0, "missing": 0}
    # batched: one search per resource type and batch, never one read per resource
    assert clean["verify"]["requests"] <= len(clean["verify"]["resources"]) * 2 < identical

    grouped = sent_by_participant(rel)
    expected = inflict(rel.program.base_url, grouped)
    code, drifted = verify(rel)
    reported = {(d["resource_type"], d["server_id"]): d["drift"] for d in drifted["verify"]["drifted"]}
    assert code == 65 and reported == expected, f"verify reported {reported}, the server shows {expected}"

    repair_code, repaired = verify(rel, "--repair")
    assert repair_code in DONE_CODES, repaired  # the repair sync's own exit: 65 for the demo's review cases
    # plus the CarePlan of each contact re-created under a new id (it links the contact: activity.outcomeReference)
    careplans = {f"enrollment:{p}" for p, resources in grouped.items() if p for r in resources
                 if r.unit_key.startswith("contact:") and reported.get((r.resource_type, r.server_id)) == "missing"}
    assert repaired["repair"]["marked"] == len(set(drifted["verify"]["drifted_units"]) | careplans)
    assert repaired["repair"]["counts"]["pending"] == repaired["repair"]["counts"]["quarantined"] == 0

    code, after = verify(rel)
    assert code == 0, after["verify"]["drifted"]
    assert after["verify"]["totals"] == {"identical": identical, "changed": 0, "missing": 0}
    reference = references.get(PARTICIPANTS)["content"]
    verdict = check_invariant(rel, reference)  # no duplicates (Provenance too), nothing lost, clean-sync content
    content = normalized_content(rel.program, verdict.found)
    restored = [key for key in identities(rel, grouped, expected) if content.get(key) == reference.get(key)]
    record(name, f"Server drift: {title}", runs=1, faults_injected=1, faults_by_kind={"server edited": 1},
           records_sent=verdict.sent, duplicates=verdict.duplicates, lost=verdict.lost + verdict.extra,
           content_mismatches=verdict.content_mismatches, drift_reported=len(reported), repaired=len(restored),
           notes=[f"verify before the drift: {identical} identical in {clean['verify']['requests']} requests; "
                  f"after it: {sum(1 for d in reported.values() if d == 'missing')} missing, "
                  f"{sum(1 for d in reported.values() if d == 'changed')} changed, "
                  f"in {len(drifted['verify']['drifted_units'])} record(s)",
                  f"verify --repair re-sent {repaired['repair']['marked']} record(s) (exit {repair_code}); "
                  f"the second verify: {after['verify']['totals']['identical']} identical, 0 changed, 0 missing"])
    assert len(restored) == len(reported), f"restored {len(restored)} of the {len(reported)} drifted resources"
