"""`peersync sync --log-format json -v` on the demo program against the real local HAPI server: every stderr
line is a JSON object with the run id, and no value of the demo's patient data set appears anywhere in the
logs or the command's output (names, MRNs, notes, goal texts, referral outcome notes, identifier values)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .syncutil import DEMO, Program, make_program

pytestmark = pytest.mark.integration

# Columns of fixtures/demo/template/*.csv that hold patient data or identifier values.
PHI_COLUMNS = {
    "supporters.csv": ("staff_id", "given_name", "family_name", "phone", "email", "npi"),
    "enrollments.csv": ("enrollment_id", "participant_id", "mrn"),
    "contacts.csv": ("contact_id", "enrollment_id", "supporter_id", "notes", "group_session_id",
                     "planned_contact_id", "goal_ids"),
    "goals.csv": ("goal_id", "enrollment_id", "goal_in_own_words"),
    "goal_notes.csv": ("note_id", "goal_id", "note"),
    "referrals.csv": ("referral_id", "enrollment_id", "resource_id", "outcome_notes"),
    "planned_contacts.csv": ("planned_contact_id", "enrollment_id"),
}


NAME_COLUMNS = ("given_name", "family_name")


def phi_values() -> set[str]:
    """Every sensitive value of the demo program and the clinic's Patients."""
    values: set[str] = set()
    names: set[str] = set()
    for file_name, columns in PHI_COLUMNS.items():
        with (DEMO / "template" / file_name).open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                for column in columns:
                    raw = row.get(column) or ""
                    for value in re.split(r"[;,]", raw) if column == "goal_ids" else [raw]:
                        if value.strip():
                            (names if column in NAME_COLUMNS else values).add(value.strip())
    bundle = json.loads((DEMO / "clinic" / "patients.json").read_text(encoding="utf-8"))
    for entry in bundle["entry"]:
        patient = entry["resource"]
        for name in patient.get("name", []):
            names.update(name.get("given", []))
            if name.get("family"):
                names.add(name["family"])
        values.update(i["value"] for i in patient.get("identifier", []) if i.get("value"))
        if patient.get("birthDate"):
            values.add(patient["birthDate"])
        values.update(t["value"] for t in patient.get("telecom", []) if t.get("value"))
    # Names with a space ("María Elena") are checked whole and word by word.
    return values | names | {part for name in names for part in name.split() if len(part) >= 2}


def leaks(text: str, values: set[str]) -> list[str]:
    """Values found in text as whole tokens (case-sensitive): 'Ana' must not match inside 'Analysis'."""
    return sorted(v for v in values if re.search(rf"(?<![\w]){re.escape(v)}(?![\w])", text))


def peersync(program: Program, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PEERSYNC_")}
    env["PEERSYNC_SECRETS_DIR"] = ""
    return subprocess.run([sys.executable, "-m", "connector.cli", *args, "--config", str(program.config)],
                          capture_output=True, text=True, env=env, cwd=program.root, timeout=600, check=False)


def json_lines(stderr: str) -> list[dict]:
    lines = []
    for number, line in enumerate(stderr.splitlines(), start=1):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"stderr line {number} is not JSON: {line!r}")
    return lines


def test_the_phi_set_is_what_we_think() -> None:
    values = phi_values()
    assert {"MRN1680963", "E0001", "C000001", "G0001", "GN0001", "R0001", "PC0001", "S002", "Terrence",
            "Rodríguez", "Luis"} <= values
    assert "First visit. Went over the program, what a peer supporter does, main worries." in values
    assert len(values) > 1000


def test_sync_json_logs_carry_run_id_and_no_patient_data(tmp_path: Path, fhir_base_url: str) -> None:
    program = make_program(tmp_path, fhir_base_url)
    values = phi_values()

    first = peersync(program, "sync", "--log-format", "json", "-v", "--json")
    assert first.returncode == 65, first.stderr[-2000:]
    summary = json.loads(first.stdout)
    lines = json_lines(first.stderr)
    assert len(lines) > 10, "expected -v detail: transactions, plan, review warnings"
    assert {line["run_id"] for line in lines} == {summary["run_id"]}
    events = {line.get("event") for line in lines}
    assert {"run-started", "read", "plan", "transaction", "review", "run-finished"} <= events
    assert all(re.fullmatch(r"rk-[0-9a-f]{12}|program", line["participant_key"]) for line in lines
               if "participant_key" in line)

    # A second run with a voided contact and an edited goal note: updates, voids, more log lines.
    contacts = (program.inputs / "contacts.csv").read_text(encoding="utf-8").splitlines()
    header, rows = contacts[0], contacts[1:]
    (program.inputs / "contacts.csv").write_text("\n".join([header, *rows[:-5]]) + "\n", encoding="utf-8")
    second = peersync(program, "sync", "--log-format", "json", "-v", "--json")
    assert second.returncode == 65, second.stderr[-2000:]
    second_lines = json_lines(second.stderr)
    assert {line["run_id"] for line in second_lines} == {json.loads(second.stdout)["run_id"]}

    status = peersync(program, "status", "--json", "--log-format", "json", "-v")
    doctor = peersync(program, "doctor", "--json", "--log-format", "json", "-v")
    assert status.returncode == 0 and doctor.returncode == 0, doctor.stdout
    json_lines(status.stderr), json_lines(doctor.stderr)

    for name, text in (("sync stderr", first.stderr), ("sync stdout", first.stdout),
                       ("second sync stderr", second.stderr), ("second sync stdout", second.stdout),
                       ("status", status.stdout + status.stderr), ("doctor", doctor.stdout + doctor.stderr)):
        found = leaks(text, values)
        assert not found, f"{name} contains patient data or identifier values: {found[:10]}"


def test_text_logs_are_also_free_of_patient_data(tmp_path: Path, fhir_base_url: str) -> None:
    program = make_program(tmp_path, fhir_base_url)
    result = peersync(program, "sync", "-v")
    assert result.returncode == 65
    assert "[run " in result.stderr and "partial (exit 65)" in result.stdout
    found = leaks(result.stdout + result.stderr, phi_values())
    assert not found, found[:10]


def test_sync_with_clinical_notes_logs_no_patient_data(tmp_path: Path, fhir_base_url: str) -> None:
    """The same scan with clinical notes written beside the structured resources (program.clinical_notes = "also"),
    then one per contact (every note replaced: superseded), so the note units' log lines are covered too."""
    program = make_program(tmp_path, fhir_base_url)
    config = program.config.read_text(encoding="utf-8")
    program.config.write_text(config.replace("[program]\n", '[program]\nclinical_notes = "also"\n', 1)
                              .replace("[sync]\n", "[sync]\nmax_delete_fraction = 1.0\n", 1), encoding="utf-8")
    values = phi_values()
    first = peersync(program, "sync", "--log-format", "json", "-v", "--json")
    assert first.returncode == 65, first.stderr[-2000:]
    assert json.loads(first.stdout)["counts"]["created"] > 0
    text = program.config.read_text(encoding="utf-8")
    program.config.write_text(text.replace('clinical_notes = "also"\n', 'clinical_notes = "also"\nnote_period = '
                                           '"contact"\n'), encoding="utf-8")
    second = peersync(program, "sync", "--log-format", "json", "-v", "--json")
    assert second.returncode == 65, second.stderr[-2000:]
    json_lines(first.stderr), json_lines(second.stderr)
    for name, output in (("sync", first.stdout + first.stderr), ("re-sync per contact", second.stdout + second.stderr)):
        found = leaks(output, values)
        assert not found, f"{name} with clinical notes contains patient data or identifier values: {found[:10]}"
