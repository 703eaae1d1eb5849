"""Helpers for sync integration tests: an isolated copy of the demo program per test, and the server's state.

Each test gets its own program id (so its identifier systems are unique on the shared server) and its own
MRN system (so its Patients are its own), so tests never see each other's data.
"""

from __future__ import annotations

import csv
import json
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from connector.identifiers import token_query
from connector.map import MappingContext
from connector.map.units import map_global_unit, map_participant_units
from connector.model import RecordKind
from connector.ops.config import Settings, load_settings
from connector.ops.landed import PROGRAM_RESOURCES
from connector.ops.logs import new_run_id
from connector.plan.planner import (
    Act,
    compute_plan,
    program_fingerprint,
    units_to_write,
)
from connector.read.program import read_program
from connector.read.staging import Staging
from connector.run import RunSummary, Syncer
from connector.wiring import build_client, sync_options

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "fixtures" / "demo"
DEMO_MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"


@dataclass
class Program:
    """One test's isolated demo program: input folder, config file, settings."""

    root: Path
    inputs: Path
    config: Path
    program_id: str
    mrn_system: str
    base_url: str
    headers: dict[str, str] = field(default_factory=dict)  # for the harness's own requests (a server with auth)

    def settings(self) -> Settings:
        return load_settings(self.config)

    def sync(self, **overrides: Any) -> RunSummary:
        """Run one sync in-process and return its summary (exit code in summary.exit_code)."""
        settings = self.settings()
        for section, values in overrides.items():
            for key, value in values.items():
                setattr(getattr(settings, section), key, value)
        new_run_id()
        syncer = Syncer(sync_options(settings), build_client(settings))
        return syncer.run(new_run_id())  # an error propagates to the test; the summary is in the ledger

    def context(self) -> MappingContext:
        from connector.wiring import mapping_context

        return mapping_context(self.settings())


def make_program(tmp_path: Path, fhir_base_url: str, *, concurrency: int = 4,
                 headers: dict[str, str] | None = None, patient_bundle_type: str = "transaction") -> Program:
    """Copy the demo template inputs, give them a unique program id and MRN system, load its Patients.

    ``headers`` go with the harness's own requests (loading Patients, reading the server's state), e.g. an
    ``Authorization`` header for a server that enforces SMART scopes. ``patient_bundle_type="batch"`` loads them
    for a server that refuses a 40-entry conditional transaction (Medplum).
    """
    program_id = "t" + uuid.uuid4().hex[:10]
    mrn_system = f"urn:oid:2.16.840.1.113883.3.9999.{uuid.uuid4().int % 10**9}"
    inputs = tmp_path / "inputs"
    shutil.copytree(DEMO / "template", inputs, ignore=shutil.ignore_patterns("summary.json"))
    config = tmp_path / "peersync.toml"
    config.write_text(
        f"""
[source]
profile = "peersync-template"
inputs = ["inputs"]
[program]
id = "{program_id}"
mrn_system = "{mrn_system}"
[server]
base_url = "{fhir_base_url}"
[sync]
ledger = "state/ledger.sqlite"
concurrency = {concurrency}
backoff_factor = 0.05
backoff_max_seconds = 0.5
""",
        encoding="utf-8",
    )
    program = Program(tmp_path, inputs, config, program_id, mrn_system, fhir_base_url, dict(headers or {}))
    load_patients(program, bundle_type=patient_bundle_type)
    return program


def load_patients(program: Program, bundle_type: str = "transaction") -> None:
    """The clinic's Patients for this program (the demo bundle, under the test's MRN system)."""
    text = (DEMO / "clinic" / "patients.json").read_text(encoding="utf-8")
    text = text.replace(DEMO_MRN_SYSTEM, program.mrn_system)
    text = text.replace(token_query(DEMO_MRN_SYSTEM, "x").split("%7C")[0],
                        token_query(program.mrn_system, "x").split("%7C")[0])
    bundle = json.loads(text)
    for entry in bundle["entry"]:  # client ids must be unique per test too
        url = entry["request"]["url"]
        if url.startswith("Patient/"):
            new_id = f"{url.split('/', 1)[1]}-{program.program_id}"
            entry["request"]["url"] = f"Patient/{new_id}"
            entry["resource"]["id"] = new_id
    bundle["type"] = bundle_type
    response = requests.post(program.base_url, json=bundle,
                             headers={"Content-Type": "application/fhir+json", **program.headers}, timeout=120)
    response.raise_for_status()
    failed = [e["response"]["status"] for e in response.json().get("entry", [])
              if not str(e.get("response", {}).get("status", "")).startswith("2")]
    assert not failed, f"Patients not loaded: {failed}"


def demo_summary() -> dict[str, Any]:
    return json.loads((DEMO / "template" / "summary.json").read_text(encoding="utf-8"))


# -- the inputs ---------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, rows: list[dict[str, str]], fieldnames: list[str] | None = None) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def demo_enrollments() -> list[str]:
    return [r["enrollment_id"] for r in read_csv(DEMO / "template" / "enrollments.csv")]


def trim_inputs(inputs: Path, keep: set[str]) -> None:
    """Keep only the rows of the given enrollments (and their goals' notes) in a copy of the demo template."""
    kept_goals: set[str] = set()
    for name in ("enrollments.csv", "goals.csv", "contacts.csv", "planned_contacts.csv", "referrals.csv"):
        path = inputs / name
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if r["enrollment_id"] in keep]
        if name == "goals.csv":
            kept_goals = {r["goal_id"] for r in rows}
        write_csv(path, rows, fields)
    path = inputs / "goal_notes.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if r["goal_id"] in kept_goals]
    write_csv(path, rows, fields)


# -- the server's state -------------------------------------------------------------------------------


def server_resources(program: Program) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every resource of the program on the server, grouped by (type, identifier value) per identifier system."""
    ctx = program.context()
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for resource_type, kind, _ in PROGRAM_RESOURCES:
        system = ctx.system(kind)
        url: str | None = f"{program.base_url}/{resource_type}?identifier={token_query(system, '')}&_count=500"
        while url:
            bundle = requests.get(url, headers=program.headers, timeout=120).json()
            for entry in bundle.get("entry", []):
                resource = entry["resource"]
                for ident in resource.get("identifier", []):
                    if ident.get("system") == system:
                        found.setdefault((resource_type, f"{kind}|{ident['value']}"), []).append(resource)
            url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return found


def expected_identities(program: Program, exclude_participants: set[str],
                        refused_types: frozenset[str] = frozenset()) -> Counter[str]:
    """Resource counts per type that a clean sync of the program's current inputs must leave on the server. The
    resources of ``refused_types`` are parked; the other resources of their units land (docs/ehr-restrictions.md)."""
    settings = program.settings()
    opts = sync_options(settings)
    counts: Counter[str] = Counter()
    with Staging(program.root / "expected.sqlite") as staging:
        staging.db.execute("DELETE FROM staged")
        read_program(opts.profile, opts.inputs, staging)
        for kind, key in [("program", opts.ctx.program_id)] + [("supporter", s) for s in _keys(staging, "supporter")] \
                + [("cbo", c) for c in _cbo_ids(staging)]:
            unit = map_global_unit(staging, kind, key, opts.ctx)
            if unit:
                counts.update(r["resourceType"] for r in unit.resources if r["resourceType"] not in refused_types)
        for participant in staging.participants():
            if participant in exclude_participants:
                continue
            units = [(k, key) for k in ("enrollment", "goal", "contact", "planned_contact", "referral")
                     for key in (_keys(staging, k, participant) if k != "enrollment" else [participant])]
            for unit in map_participant_units(staging, participant, units, opts.ctx):
                counts.update(r["resourceType"] for r in unit.resources if r["resourceType"] not in refused_types)
    (program.root / "expected.sqlite").unlink()
    return counts


def _keys(staging: Staging, kind: str, participant: str | None = None) -> list[str]:
    if participant is None:
        return [r[0] for r in staging.db.execute("SELECT key FROM staged WHERE kind=? ORDER BY seq", (kind,))]
    return staging.keys(RecordKind(kind), participant)


def _cbo_ids(staging: Staging) -> list[str]:
    return [r[0] for r in staging.db.execute(
        "SELECT DISTINCT json_extract(body,'$.resource_id') FROM staged WHERE kind='referral' "
        "AND json_extract(body,'$.resource_id') IS NOT NULL")]


def assert_clean_state(program: Program, exclude_participants: set[str]) -> dict[tuple[str, str], list[dict]]:
    """Every identifier matches exactly one resource, and the counts per type are exactly the expected ones."""
    found = server_resources(program)
    duplicates = {k: len(v) for k, v in found.items() if len(v) != 1}
    assert not duplicates, f"identifiers matching more than one resource: {duplicates}"
    by_type = Counter(k[0] for k in found)
    expected = expected_identities(program, exclude_participants)
    assert by_type == expected, f"server {dict(by_type)} != expected {dict(expected)}"
    return found


__all__ = ["Act", "Program", "assert_clean_state", "compute_plan", "demo_enrollments", "demo_summary", "make_program",
           "program_fingerprint", "read_csv", "server_resources", "trim_inputs", "units_to_write", "write_csv"]
