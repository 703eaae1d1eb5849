"""`peersync map` writes exactly what a sync sends: the demo program synced over `responses` (canned HAPI-like
answers from tests/unit/fhir_answers.py, every transaction captured) and mapped to files give the same bundles:
same entries, same requests, same Provenance (change-set tag and ifNoneExist), same chunking.

Only what a sync alone can know is normalised: server ids (a sync refers to resources already written, and to the
Patient, by ``Type/id``; map keeps the conditional reference) and the Provenance's random fullUrl. Both run with
the same clock, so ``recorded`` is compared as is.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import responses
from responses import matchers

from connector.identifiers import conditional_reference
from connector.map import MappingContext
from connector.map.export import map_program
from connector.read.profile import load_profile
from connector.read.staging import Staging
from connector.run import Syncer, SyncOptions
from connector.server.client import FhirClient, RetryPolicy
from tests.unit.fhir_answers import (
    BASE,
    answer_transactions,
    capability_statement,
    landed,
    patient,
    searchset,
    sent_transactions,
)

DEMO = Path(__file__).resolve().parents[2] / "fixtures" / "demo" / "template"
PROFILE = load_profile("peersync-template")
CLOCK = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
FAST = RetryPolicy(attempts=0, backoff_factor=0.0, backoff_max=0.0, jitter=0.0, retry_after_cap=0.0)


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


def demo_mrns() -> list[str]:
    with (DEMO / "enrollments.csv").open(encoding="utf-8") as handle:
        return sorted({row["mrn"] for row in csv.DictReader(handle) if row["mrn"]})


def normalised(bundle: dict[str, Any], literal_to_conditional: dict[str, str]) -> str:
    """The bundle with literal server references made conditional again and the Provenance fullUrl dropped."""
    text = json.dumps(bundle, sort_keys=True)
    for literal, conditional in literal_to_conditional.items():
        text = text.replace(json.dumps(literal), json.dumps(conditional))
    out = json.loads(text)
    for entry in out["entry"]:
        if entry["resource"]["resourceType"] == "Provenance":
            entry.pop("fullUrl")
    return json.dumps(out, sort_keys=True)


@pytest.mark.parametrize("max_bundle_entries", [100, 7])  # 7: participants' change-sets cut into several bundles
def test_map_writes_the_bundles_a_sync_sends(rsps: responses.RequestsMock, tmp_path: Path,
                                             max_bundle_entries: int) -> None:
    ctx = MappingContext.from_profile(PROFILE)
    mrns = demo_mrns()
    rsps.add(responses.GET, f"{BASE}/metadata", json=capability_statement())
    for i, mrn in enumerate(mrns):
        rsps.add(responses.GET, f"{BASE}/Patient", json=searchset([patient(f"pt-{i}", ctx.mrn_system, mrn)]),
                 match=[matchers.query_param_matcher({"identifier": f"{ctx.mrn_system}|{mrn}"})])
    # the EHR has none of the Conditions the enrollments name: the sync's CarePlans address none, like map's
    rsps.add(responses.GET, f"{BASE}/Condition", json=searchset([]))
    rsps.add_callback(responses.POST, f"{BASE}/", callback=answer_transactions())
    opts = SyncOptions(profile=PROFILE, inputs=[DEMO], ledger_path=tmp_path / "ledger.sqlite", ctx=ctx,
                       rejects_dir=tmp_path / "rejects", concurrency=1, max_bundle_entries=max_bundle_entries)
    summary = Syncer(opts, FhirClient(BASE, retry=FAST), clock=lambda: CLOCK).run("run")
    assert summary.counts["in_review"] == 0 and summary.counts["quarantined"] == 0

    with Staging(tmp_path / "map.sqlite") as staging:
        map_program(PROFILE, [DEMO], ctx, tmp_path / "out", staging, recorded=CLOCK,
                    max_bundle_entries=max_bundle_entries)
    mapped = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((tmp_path / "out" / "bundles").glob("*.json"))]

    literal_to_conditional = {f"Patient/pt-{i}": conditional_reference("Patient", ctx.mrn_system, mrn)
                              for i, mrn in enumerate(mrns)}
    for request_entry, response_entry in landed(rsps):  # the ids the server answered, by business identifier
        resource = request_entry["resource"]
        if resource.get("identifier"):
            ident = resource["identifier"][0]
            literal = response_entry["response"]["location"].split("/_history")[0]
            literal_to_conditional[literal] = conditional_reference(resource["resourceType"], ident["system"],
                                                                    ident["value"])
    sent = sorted(normalised(b, literal_to_conditional) for b in sent_transactions(rsps))
    written = sorted(normalised(b, {}) for b in mapped)
    assert len(sent) == len(written) == summary.write_requests
    assert sent == written
    provenance_requests = [json.loads(b)["entry"][-1]["request"] for b in written]
    assert all(r["method"] == "POST" and r["ifNoneExist"].startswith("_tag=") for r in provenance_requests)
