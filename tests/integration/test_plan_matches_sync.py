"""`peersync plan` tells the truth: run it, then `sync`, on the demo, and compare them number by number.

The plan cannot know offline which Patients the EHR has: the demo's participants with an unknown or ambiguous
MRN go to review, so their records are counted `in_review` by the sync instead of created. Every other count
must be exactly the plan's.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from connector.cli import main
from connector.plan.ledger import Ledger
from connector.plan.planner import SYNC_COUNT_NAMES, WRITE_ACTIONS
from connector.read.staging import Staging
from connector.run import read_and_plan
from connector.wiring import sync_options

from .syncutil import Program, demo_summary, make_program

pytestmark = pytest.mark.integration

SUMMARY = demo_summary()
REVIEW = set(SUMMARY["unmatched_enrollments"]) | set(SUMMARY["ambiguous_enrollments"])


def plan_cli(program: Program) -> tuple[int, dict[str, Any]]:
    """`peersync plan --json` as an operator runs it: (exit code, output)."""
    result = CliRunner().invoke(main, ["plan", "--config", str(program.config), "--json", "-q"])
    return result.exit_code, json.loads(result.stdout)


def planned_for_review(program: Program) -> tuple[Counter[str], int]:
    """The plan's sync counts of the participants the sync will send to review, and how many units they have."""
    opts = sync_options(program.settings())
    with tempfile.TemporaryDirectory() as tmp, Staging(Path(tmp) / "s.sqlite") as staging, \
            Ledger(opts.ledger_path) as ledger:
        _report, plan, _rejects = read_and_plan(opts, ledger, staging)
    review: Counter[str] = Counter()
    units = 0
    for participant in REVIEW:
        review.update(plan.reported_by_participant.get(participant, Counter()))
        units += sum(plan.by_participant.get(participant, Counter())[a] for a in WRITE_ACTIONS)
    return review, units


def assert_plan_matches_sync(program: Program) -> None:
    code, planned = plan_cli(program)
    review, review_units = planned_for_review(program)
    summary = program.sync()
    counts = summary.counts
    assert code == summary.exit_code
    assert planned["sync_counts"]["rejected"] == counts["rejected"] == SUMMARY["expected_rejects"]
    assert planned["sync_counts"]["retried"] == counts["retried"]
    assert counts["in_review"] == review_units > 0
    for name in SYNC_COUNT_NAMES:
        assert planned["sync_counts"][name] - review[name] == counts[name], name
    assert counts["pending"] == counts["quarantined"] == 0


def test_plan_then_sync_agree_on_the_first_run_and_after_edits(tmp_path: Path, fhir_base_url: str) -> None:
    program = make_program(tmp_path, fhir_base_url)
    assert_plan_matches_sync(program)  # first run: creates, and the demo's voided rows as voids

    contacts = program.inputs / "contacts.csv"
    with contacts.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    landed = [r for r in rows if r["enrollment_id"] not in REVIEW and r.get("void", "") in ("", "0")
              and r["contact_id"].startswith("C")]
    landed[0]["notes"] = "edited after the first run"
    landed[1]["void"] = "1"
    gone = landed[2]["contact_id"]
    rows = [r for r in rows if r["contact_id"] != gone]
    rows.append(dict(landed[3], contact_id="C900001"))
    with contacts.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert_plan_matches_sync(program)  # an update, a void, a deletion, a create; the rest unchanged
