"""peersync sync against the real local HAPI FHIR server: the seven proofs of the sync issue."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

import connector.map.units
from connector.plan.ledger import Ledger

from .syncutil import (
    Program,
    assert_clean_state,
    demo_summary,
    make_program,
    server_resources,
)

pytestmark = pytest.mark.integration

SUMMARY = demo_summary()
REVIEW = set(SUMMARY["unmatched_enrollments"]) | set(SUMMARY["ambiguous_enrollments"])


@pytest.fixture()
def program(tmp_path: Path, fhir_base_url: str) -> Program:
    return make_program(tmp_path, fhir_base_url)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def landed_contacts(program: Program) -> list[dict[str, str]]:
    """Contact rows that a first sync lands (not voided, not bad, participant not in review)."""
    found = server_resources(program)
    rows = read_csv(program.inputs / "contacts.csv")
    return [r for r in rows if ("Communication", f"contact|{r['contact_id']}") in found
            and r["enrollment_id"] not in REVIEW and r.get("void", "") in ("", "0")]


def versions(found: dict) -> dict:
    return {k: v[0]["meta"]["versionId"] for k, v in found.items()}


def test_1_demo_sync_lands_exactly_the_expected_resources(program: Program) -> None:
    summary = program.sync()
    assert summary.exit_code == 65  # the demo has bad rows and two participants for review
    assert summary.counts["rejected"] == SUMMARY["expected_rejects"]
    assert summary.counts["pending"] == 0 and summary.counts["quarantined"] == 0
    assert_clean_state(program, REVIEW)


def test_2_unchanged_resync_sends_nothing(program: Program) -> None:
    program.sync()
    summary = program.sync()
    # Units of participants in review are retried each run (their Patient may have appeared), which costs
    # one Patient search each; no write request is ever sent for unchanged content.
    assert summary.write_requests == 0
    assert summary.counts["created"] == summary.counts["updated"] == summary.counts["voided"] == 0
    assert summary.requests == len(REVIEW) + 1  # one Patient search per review participant + /metadata


def _not_a_first_contact(found: dict, candidates: list[dict[str, str]]) -> str:
    """A landed contact that is not its supporter's first with the participant: voiding it leaves the CareTeam (which
    lists each supporter from their first contact) as it is, so only the contact itself changes."""
    def key(contact_id: str) -> tuple[str, str, datetime]:
        c = found[("Communication", f"contact|{contact_id}")][0]
        sent = datetime.fromisoformat(c.get("sent", "9999-12-31T00:00:00+00:00"))  # a cancelled contact: none
        return c["basedOn"][0]["reference"], c["sender"]["reference"], sent
    for row in candidates:
        plan, sender, sent = key(row["contact_id"])
        if any(key(o["contact_id"])[:2] == (plan, sender) and key(o["contact_id"])[2] < sent for o in candidates):
            return row["contact_id"]
    raise AssertionError("the demo has no supporter with two landed contacts for one participant")


def test_3_edits_voids_and_additions_reach_the_server_exactly(program: Program) -> None:
    program.sync()
    before_resources = server_resources(program)
    before = versions(before_resources)
    rows = read_csv(program.inputs / "contacts.csv")
    landed = landed_contacts(program)
    edited = {landed[0]["contact_id"], landed[1]["contact_id"]}
    # contacts that took place: each is an outcome of its participant's CarePlan (MCC), so voiding one or adding
    # two changes the CarePlans of their participants too
    performed = [r for r in landed[2:] if r["outcome"] == "completed"]
    voided = _not_a_first_contact(before_resources, performed)
    for row in rows:
        if row["contact_id"] in edited:
            row["notes"] = (row["notes"] or "") + " (corrected)"
            row["duration_minutes"] = "45"
        if row["contact_id"] == voided:
            row["void"] = "1"
    template = dict(next(r for r in performed if r["contact_id"] != voided))
    for new_id in ("C900001", "C900002"):
        rows.append(template | {"contact_id": new_id, "planned_contact_id": "", "notes": "new contact"})
    write_csv(program.inputs / "contacts.csv", rows)
    goals = read_csv(program.inputs / "goals.csv")
    edited_goal = next(g for g in goals if g["enrollment_id"] not in REVIEW
                       and ("Goal", f"goal|{g['goal_id']}") in before and g.get("void", "") in ("", "0"))
    edited_goal["achievement_status"] = "improving"
    write_csv(program.inputs / "goals.csv", goals)

    summary = program.sync()
    # the CarePlans of the voided contact's and the new contacts' participants list other outcomes now
    plans = {next(r["enrollment_id"] for r in performed if r["contact_id"] == voided), template["enrollment_id"]}
    after = server_resources(program)
    changed = {k for k, v in versions(after).items() if before.get(k) != v}
    counts = (summary.counts["updated"], summary.counts["voided"], summary.counts["created"])
    assert counts == (3 + len(plans), 1, 2), changed
    assert changed == ({("Communication", f"contact|{c}") for c in edited | {voided, "C900001", "C900002"}}
                       | {("Goal", f"goal|{edited_goal['goal_id']}")}
                       | {("CarePlan", f"careplan|{e}") for e in plans})
    assert after[("Communication", f"contact|{voided}")][0]["status"] == "entered-in-error"
    assert_clean_state(program, REVIEW)


def test_4_unknown_and_ambiguous_mrn_go_to_review_while_others_land(program: Program) -> None:
    summary = program.sync()
    with Ledger(program.settings().sync.ledger) as ledger:
        reviews = {(r["subject"], r["reason"]) for r in ledger.reviews()}
    assert reviews == {(f"participant:{p}", "patient-not-found") for p in SUMMARY["unmatched_enrollments"]} | \
        {(f"participant:{p}", "patient-ambiguous") for p in SUMMARY["ambiguous_enrollments"]}
    assert summary.counts["in_review"] > 0
    found = server_resources(program)
    assert not [k for k in found if k[0] == "CarePlan" and k[1].split("|")[1] in REVIEW]
    assert_clean_state(program, REVIEW)


def test_5_a_rejected_record_is_quarantined_and_the_rest_lands(program: Program,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    victim = landed_contacts_from_inputs(program)[0]
    original = connector.map.units.map_contact

    def corrupt(contact, enrollment, ctx, **narrative_sources):  # type: ignore[no-untyped-def]
        resource = original(contact, enrollment, ctx, **narrative_sources)
        if contact.contact_id == victim["contact_id"]:
            resource["status"] = "not-a-status-code"  # the server refuses this code
        return resource

    monkeypatch.setattr(connector.map.units, "map_contact", corrupt)
    summary = program.sync()
    assert summary.counts["quarantined"] == 1
    with Ledger(program.settings().sync.ledger) as ledger:
        unit = ledger.unit(f"contact:{victim['contact_id']}")
    assert unit is not None and unit.state == "quarantined" and "HTTP 400" in (unit.detail or "")
    found = server_resources(program)
    assert ("Communication", f"contact|{victim['contact_id']}") not in found
    siblings = [r for r in read_csv(program.inputs / "contacts.csv") if r["enrollment_id"] == victim["enrollment_id"]
                and r["contact_id"] != victim["contact_id"] and r.get("void", "") in ("", "0")]
    assert all(("Communication", f"contact|{r['contact_id']}") in found for r in siblings)
    assert ("CarePlan", f"careplan|{victim['enrollment_id']}") in found
    # Fixed at the source (here: the corruption removed), the next run sends it and the state is clean.
    monkeypatch.setattr(connector.map.units, "map_contact", original)
    rows = read_csv(program.inputs / "contacts.csv")
    for row in rows:
        if row["contact_id"] == victim["contact_id"]:
            row["notes"] = (row["notes"] or "") + " fixed"
    write_csv(program.inputs / "contacts.csv", rows)
    assert program.sync().counts["created"] == 1
    assert_clean_state(program, REVIEW)


def landed_contacts_from_inputs(program: Program) -> list[dict[str, str]]:
    bad = {"", None}
    return [r for r in read_csv(program.inputs / "contacts.csv") if r["enrollment_id"] not in REVIEW
            and r.get("void", "") in ("", "0") and r["contact_id"].startswith("C") and r["mode"] not in bad
            and r["enrollment_id"].startswith("E")][5:]


def test_6_sigkill_mid_run_then_rerun_leaves_no_duplicates_and_nothing_missing(program: Program) -> None:
    ledger_path = program.settings().sync.ledger
    env = os.environ | {"PEERSYNC_SYNC__CONCURRENCY": "1", "PEERSYNC_SYNC__MAX_BUNDLE_ENTRIES": "10"}
    process = subprocess.Popen([sys.executable, "-m", "connector.cli", "sync", "--config", str(program.config), "-q"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if _sent_units(ledger_path) >= 60:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    partial = _sent_units(ledger_path)
    assert 0 < partial < 700, f"the kill should land mid-run (sent units: {partial})"
    summary = program.sync()
    assert summary.counts["pending"] == 0
    assert_clean_state(program, REVIEW)


def _sent_units(ledger_path: Path) -> int:
    if not ledger_path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT count(*) FROM units WHERE state='sent'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_7_lost_ledger_resync_makes_no_duplicates_and_no_new_versions(program: Program) -> None:
    program.sync()
    before = versions(server_resources(program))
    ledger = program.settings().sync.ledger
    for suffix in ("", "-wal", "-shm"):
        Path(str(ledger) + suffix).unlink(missing_ok=True)
    provenances = provenance_count(program)
    summary = program.sync()
    assert summary.counts["created"] == 0  # everything matched by identifier
    after = versions(server_resources(program))
    assert after == before  # no new versions: HAPI suppresses no-op updates of identical content
    assert provenance_count(program) == provenances  # replayed change-sets find their Provenance (_tag)
    assert_clean_state(program, REVIEW)


def provenance_count(program: Program) -> int:
    source = program.context().meta_source
    return requests.get(f"{program.base_url}/Provenance", params={"_source": source, "_summary": "count"},
                        timeout=60).json()["total"]
