"""``peersync pull`` against the local HAPI server, with a clinic and community-organization simulator
(clinic_sim.py) writing what an EHR and a CBO platform would.

Clinic referrals reach intake exactly once (three pulls, a SIGKILL mid-pull, a lost ledger); a concurrent EHR
edit is never overwritten; bad input from the EHR is skipped with a reason; a community organization's status
reaches the referrals report and is never rolled back by the program's next export; clinical facts are fetched
only with consent; and no patient data reaches the ledger, the logs or `status`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from reliability.faultproxy import FaultProxy, Restrictions, Schedule

from connector.identifiers import KIND_ORGANIZATION, KIND_REFERRAL_TASK, token_query
from integration.clinic_sim import UNKNOWN_SERVICE, Clinic, cbo_sets_status
from integration.syncutil import Program, demo_enrollments, make_program, read_csv, trim_inputs, write_csv

pytestmark = pytest.mark.integration

PEER_SUPPORT_CODE = "http://snomed.info/sct|103698003"


@pytest.fixture()
def program(tmp_path: Path, fhir_base_url: str) -> Program:
    program = make_program(tmp_path, fhir_base_url)
    trim_inputs(program.inputs, set(demo_enrollments()[:3]))
    with program.config.open("a", encoding="utf-8") as handle:
        handle.write(f'[pull]\nreferral_codes = ["{PEER_SUPPORT_CODE}"]\n')
    program.sync()
    return program


@pytest.fixture()
def clinic(program: Program) -> Clinic:
    ctx = program.context()
    found = requests.get(f"{program.base_url}/Organization", timeout=60, params={
        "identifier": f"{ctx.system(KIND_ORGANIZATION)}|{ctx.program_id}"}).json()
    return Clinic(program.base_url, program.mrn_system, found["entry"][0]["resource"]["id"])


def pull(program: Program, *args: str, server: str | None = None,
         env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    """Run `peersync pull --json` as the scheduler would; (exit code, summary, stderr)."""
    extra = {"PEERSYNC_SERVER__BASE_URL": server} if server else {}
    proc = subprocess.run([sys.executable, "-m", "connector.cli", "pull", "--config", str(program.config), "--json",
                           *args], capture_output=True, text=True, timeout=300, env=os.environ | extra | (env or {}))
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


def intake_rows(program: Program) -> list[dict[str, str]]:
    folder = program.settings().intake_dir()
    rows: list[dict[str, str]] = []
    for path in sorted(folder.glob("intake-*.csv")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        rows += read_csv(path)
    return rows


def task(program: Program, task_id: str) -> dict[str, Any]:
    return requests.get(f"{program.base_url}/Task/{task_id}", timeout=60).json()


def lose_ledger(program: Program) -> None:
    ledger = program.settings().sync.ledger
    for suffix in ("", "-wal", "-shm"):
        Path(str(ledger) + suffix).unlink(missing_ok=True)


def killed_pull(program: Program, *, phase: str) -> None:
    """`peersync pull` SIGKILLed at its first PUT (the Task update): before the server gets it, or after the
    server committed it but before the client heard."""
    holder: dict[str, subprocess.Popen[str]] = {}
    fired = threading.Event()

    def hook(_index: int, when: str, method: str) -> str | None:
        if method == "PUT" and when == phase and not fired.is_set():
            fired.set()
            holder["proc"].send_signal(signal.SIGKILL)
            holder["proc"].wait(60)
            return "reset"
        return None

    with FaultProxy(program.base_url, hook=hook) as proxy:
        holder["proc"] = subprocess.Popen(
            [sys.executable, "-m", "connector.cli", "pull", "--config", str(program.config), "-q"],
            env=os.environ | {"PEERSYNC_SERVER__BASE_URL": proxy.base_url}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, text=True)
        holder["proc"].wait(300)
    assert fired.is_set() and holder["proc"].returncode == -signal.SIGKILL


def test_clinic_referrals_reach_intake_exactly_once(program: Program, clinic: Clinic) -> None:
    first = [clinic.refer(clinic.patient(mrn=f"MRN-P{n}-{program.program_id}")) for n in range(2)]
    code, summary, _ = pull(program)
    assert code == 0, summary
    assert summary["delivered"] == 2 and summary["received"] == 2
    rows = intake_rows(program)
    assert sorted(r["clinic_referral"] for r in rows) == sorted(t["id"] for t in first)
    row = rows[0]
    assert row["mrn"].startswith("MRN-P") and row["phone"] and row["preferred_language"] == "es"
    assert row["referring_clinician"] == "Ana Ruiz" and row["referral_reason"].startswith("HbA1c 9.1")
    assert row["status"] == "referred" and row["referral_date"] == "2026-11-30"
    for t in first:
        assert task(program, t["id"])["status"] == "received"

    code, summary, _ = pull(program)  # again: nothing new (the overlap window sees the two again: not re-sent)
    assert (code, summary["delivered"], summary["received"]) == (0, 0, 0)

    # A crash between the intake row and the Task update: the Task is still requested, the row is written once.
    third = clinic.refer(clinic.patient(mrn=f"MRN-P3-{program.program_id}"))
    killed_pull(program, phase="before-forward")
    assert task(program, third["id"])["status"] == "requested"
    code, summary, _ = pull(program)
    assert (code, summary["delivered"], summary["received"]) == (0, 0, 1)
    assert task(program, third["id"])["status"] == "received"

    # A crash after the server took the update, then the ledger lost: the tag and the intake folder still say so.
    fourth = clinic.refer(clinic.patient(mrn=f"MRN-P4-{program.program_id}"))
    killed_pull(program, phase="after-commit")
    lose_ledger(program)
    code, summary, _ = pull(program)
    assert (code, summary["delivered"]) == (0, 0)
    # Ledger and intake folder both lost: the delivered tag on the Task still prevents a second row.
    lose_ledger(program)
    moved = program.root / "intake-moved"
    shutil.move(str(program.settings().intake_dir()), moved)
    code, summary, _ = pull(program)
    assert (code, summary["delivered"]) == (0, 0)
    shutil.rmtree(program.settings().intake_dir(), ignore_errors=True)
    shutil.move(str(moved), program.settings().intake_dir())
    delivered = [r["clinic_referral"] for r in intake_rows(program)]
    assert sorted(delivered) == sorted(t["id"] for t in [*first, third, fourth])  # each exactly once
    assert task(program, fourth["id"])["status"] == "received"


def test_a_concurrent_ehr_edit_is_re_read_and_never_overwritten(program: Program, clinic: Clinic) -> None:
    referral = clinic.refer(clinic.patient(mrn=f"MRN-C-{program.program_id}"))
    edited = threading.Event()

    def hook(_index: int, when: str, method: str) -> str | None:
        if method == "PUT" and when == "before-forward" and not edited.is_set():
            edited.set()  # the EHR changes the Task between peersync's read and its write
            current = task(program, referral["id"])
            current["note"] = [{"text": "Patient prefers evening calls"}]
            clinic.update(current)
        return None

    with FaultProxy(program.base_url, hook=hook) as proxy:
        code, summary, _ = pull(program, server=proxy.base_url)
    assert code == 0 and summary["concurrent_edits"] == 1 and summary["received"] == 1
    final = task(program, referral["id"])
    assert final["status"] == "received"
    assert final["note"] == [{"text": "Patient prefers evening calls"}]  # the EHR's edit survived


def test_bad_referrals_from_the_ehr_are_skipped_with_a_reason(program: Program, clinic: Clinic) -> None:
    good = clinic.refer(clinic.patient(mrn=f"MRN-G-{program.program_id}"))
    no_patient = clinic.refer(None)
    no_mrn = clinic.refer(clinic.patient(mrn=None))
    unknown = clinic.refer(clinic.patient(mrn=f"MRN-U-{program.program_id}"), code=UNKNOWN_SERVICE)
    other_org = clinic.create({"resourceType": "Organization", "name": "Another program"})
    elsewhere = clinic.refer(clinic.patient(mrn=f"MRN-O-{program.program_id}"), owner_id=other_org["id"])
    code, summary, _ = pull(program)
    assert code == 65
    reasons = {s["task"]: s["reason"] for s in summary["skipped"]}
    assert "names no Patient" in reasons[no_patient["id"]]
    assert "has no MRN in the configured system" in reasons[no_mrn["id"]]
    assert "does not take" in reasons[unknown["id"]] and "183524004" in reasons[unknown["id"]]
    assert [r["clinic_referral"] for r in intake_rows(program)] == [good["id"]]  # the others never blocked it
    assert task(program, elsewhere["id"])["status"] == "requested"  # another organization's Task: untouched
    for skipped in (no_patient, no_mrn, unknown):
        assert task(program, skipped["id"])["status"] == "requested"


def test_a_malformed_answer_is_reported_and_the_good_referrals_still_land(program: Program,
                                                                          clinic: Clinic) -> None:
    good = clinic.refer(clinic.patient(mrn=f"MRN-M-{program.program_id}"))
    # Request 1 finds the program's Organization; request 2 is the Task search: its answer carries three
    # malformed entries in front of the real ones.
    with FaultProxy(program.base_url, Schedule(only={2: "garbled-bundle-after-commit"})) as proxy:
        code, summary, _ = pull(program, server=proxy.base_url)
    assert code == 65
    assert [s["reason"] for s in summary["skipped"]] == ["not a Task with an id"] * 3
    assert [r["clinic_referral"] for r in intake_rows(program)] == [good["id"]]
    assert summary["referrals_report"]  # the next step ran


def test_one_task_the_ehr_refuses_never_blocks_the_others(program: Program, clinic: Clinic) -> None:
    refused, *others = [clinic.refer(clinic.patient(mrn=f"MRN-X{n}-{program.program_id}")) for n in range(3)]
    with FaultProxy(program.base_url, restrictions=Restrictions(unprocessable=frozenset({f"Task/{refused['id']}"}))) \
            as proxy:
        code, summary, _ = pull(program, server=proxy.base_url)
    assert code == 65 and summary["delivered"] == 3 and summary["received"] == 2
    assert [p.split(":")[0] for p in summary["problems"]] == [f"Task/{refused['id']}"]
    assert "HTTP 422" in summary["problems"][0] and summary["referrals_report"]
    assert [task(program, t["id"])["status"] for t in others] == ["received", "received"]
    assert task(program, refused["id"])["status"] == "requested"
    # The EHR takes it again: the next pull moves it (found by its id: the search's window has moved on), once.
    code, summary, _ = pull(program)
    assert (code, summary["delivered"], summary["received"]) == (0, 0, 1)
    assert task(program, refused["id"])["status"] == "received"
    assert sorted(r["clinic_referral"] for r in intake_rows(program)) == sorted(t["id"] for t in [refused, *others])


def test_a_referral_skipped_for_no_mrn_is_delivered_once_the_ehr_adds_it(program: Program, clinic: Clinic) -> None:
    patient = clinic.patient(mrn=None)
    waiting = clinic.refer(patient)
    no_overlap = {"PEERSYNC_PULL__OVERLAP_MINUTES": "0"}  # the incremental search alone would never see it again
    code, summary, _ = pull(program, env=no_overlap)
    assert code == 65 and [s["task"] for s in summary["skipped"]] == [waiting["id"]]
    newer = clinic.refer(clinic.patient(mrn=f"MRN-N-{program.program_id}"))  # moves the search window past it
    code, summary, _ = pull(program, env=no_overlap)
    assert (code, summary["delivered"], summary["still_skipped"], summary["skipped"]) == (0, 1, 1, [])

    patient["identifier"] = [{"system": program.mrn_system, "value": f"MRN-W-{program.program_id}"}]
    clinic.mrns.append(patient["identifier"][0]["value"])
    clinic.update(patient)  # the Patient changes; the Task (and its lastUpdated) does not
    code, summary, _ = pull(program, env=no_overlap)
    assert (code, summary["delivered"], summary["received"], summary["still_skipped"]) == (0, 1, 1, 0)
    assert sorted(r["clinic_referral"] for r in intake_rows(program)) == sorted([waiting["id"], newer["id"]])
    assert task(program, waiting["id"])["status"] == "received"


def referral_task_ids(program: Program) -> dict[str, str]:
    system = program.context().system(KIND_REFERRAL_TASK)
    bundle = requests.get(f"{program.base_url}/Task?identifier={token_query(system, '')}&_count=100", timeout=60).json()
    return {next(i["value"] for i in e["resource"]["identifier"] if i["system"] == system): e["resource"]["id"]
            for e in bundle.get("entry", [])}


def test_an_organizations_status_is_reported_and_never_rolled_back(program: Program, clinic: Clinic) -> None:
    tasks = referral_task_ids(program)
    assert {"R0001", "R0002"} <= set(tasks)
    cbo_sets_status(clinic, tasks["R0002"], "completed", output="Enrolled in SNAP")
    code, summary, _ = pull(program)
    assert code == 0 and summary["changed_by_organization"] == 1
    report = {r["referral_id"]: r for r in read_csv(Path(summary["referrals_report"]))}
    assert report["R0002"]["status"] == "completed" and report["R0002"]["changed_by"] == "organization"
    assert report["R0002"]["outputs"] == "Enrolled in SNAP"
    assert report["R0001"]["changed_by"] == "program"
    assert stat.S_IMODE(Path(summary["referrals_report"]).stat().st_mode) == 0o600
    status = subprocess.run([sys.executable, "-m", "connector.cli", "status", "--config", str(program.config)],
                            capture_output=True, text=True, timeout=120).stdout
    assert "1 changed by the organization" in status

    # The program's next export still says "made" but edits the row: the sync keeps the organization's status.
    rows = read_csv(program.inputs / "referrals.csv")
    for row in rows:
        if row["referral_id"] == "R0002":
            row["outcome_notes"] = "Called to check in"
    write_csv(program.inputs / "referrals.csv", rows)
    summary_sync = program.sync()
    assert summary_sync.counts["updated"] >= 1
    final = task(program, tasks["R0002"])
    assert final["status"] == "completed"
    assert final["output"][0]["valueString"] == "Enrolled in SNAP"
    assert final["note"] == [{"text": "Called to check in"}]  # the program's own change landed

    # A second edit of the row: the Task's current version is now one peersync wrote (keeping the organization's
    # elements); the ledger remembers the organization's change, so the program's "made" still does not return.
    for row in rows:
        if row["referral_id"] == "R0002":
            row["outcome_notes"] = "Called again"
    write_csv(program.inputs / "referrals.csv", rows)
    assert program.sync().counts["updated"] >= 1
    final = task(program, tasks["R0002"])
    assert final["status"] == "completed" and final["output"][0]["valueString"] == "Enrolled in SNAP"
    assert final["note"] == [{"text": "Called again"}]
    code, summary, _ = pull(program)
    assert code == 0 and summary["changed_by_organization"] == 1
    report = {r["referral_id"]: r for r in json.loads(Path(summary["referrals_report"]).with_suffix(".json")
                                                       .read_text(encoding="utf-8"))}
    assert (report["R0002"]["status"], report["R0002"]["changed_by"]) == ("completed", "organization")
    assert report["R0002"]["outputs"] == "Enrolled in SNAP"
    assert report["R0002"]["version"] == final["meta"]["versionId"]  # a version peersync wrote, still theirs
    assert (report["R0001"]["status"], report["R0001"]["changed_by"]) == (task(program, tasks["R0001"])["status"],
                                                                          "program")
    assert stat.S_IMODE(Path(summary["referrals_report"]).with_suffix(".json").stat().st_mode) == 0o600
    status = json.loads(subprocess.run([sys.executable, "-m", "connector.cli", "status", "--config",
                                        str(program.config), "--json"], capture_output=True, text=True,
                                       timeout=120).stdout)
    listed = {r["referral_id"]: r for r in status["referrals"]["community_referrals"]}
    assert (listed["R0002"]["status"], listed["R0002"]["changed_by"]) == ("completed", "organization")
    assert status["last_pull"]["exit_code"] == 0 and status["last_run"]["command"] == "sync"


def _patient_id(program: Program, enrollment_id: str) -> str:
    import sqlite3

    with sqlite3.connect(program.settings().sync.ledger) as db:
        return db.execute("SELECT patient_id FROM participants WHERE participant=?", (enrollment_id,)).fetchone()[0]


def test_clinical_facts_only_with_consent(program: Program, clinic: Clinic) -> None:
    enrollment = demo_enrollments()[0]
    patient_id = _patient_id(program, enrollment)
    clinic.a1c(patient_id, 8.4, "2026-10-02")
    clinic.a1c(patient_id, 7.6, "2026-11-20")
    clinic.weight(patient_id, 91.2, "2026-11-21")
    # More than a page of blood pressure readings, all newer than the HbA1c: they must not hide it.
    for n in range(22):
        clinic.blood_pressure(patient_id, 120 + n, 80, f"2026-11-{21 + n % 9:02d}T{8 + n // 9:02d}:00:00Z")
    clinic.blood_pressure(patient_id, 128, 82, "2026-12-01")
    clinic.appointment(patient_id, "2027-01-12T09:00:00Z")
    goals = read_csv(program.inputs / "goals.csv")
    template = next(g for g in goals if g["enrollment_id"] == enrollment)
    goals += [{**template, "goal_id": "G-A1C", "target_measure": "hba1c", "target_comparator": "<", "target_value": "7",
               "target_unit": "%"},
              {**template, "goal_id": "G-KG", "target_measure": "body-weight", "target_comparator": "<=",
               "target_value": "88", "target_unit": "kg"}]
    write_csv(program.inputs / "goals.csv", goals)
    with program.config.open("a", encoding="utf-8") as handle:
        handle.write("clinical_facts = true\n")
    with FaultProxy(program.base_url) as proxy:  # no consent recorded yet
        code, summary, _ = pull(program, server=proxy.base_url)
        by_type = dict(proxy.stats.by_type)
    assert code == 0 and summary["clinical_participants"] == 0
    assert by_type.get("Observation", 0) == 0 and by_type.get("Appointment", 0) == 0, by_type  # counted at the wire
    assert by_type.get("Task", 0) >= 1  # the proxy saw the pull's other requests

    rows = read_csv(program.inputs / "enrollments.csv")
    for row in rows:
        if row["enrollment_id"] == enrollment:
            row["clinical_consent"] = "yes"
    write_csv(program.inputs / "enrollments.csv", rows)
    with FaultProxy(program.base_url) as proxy:
        code, summary, _ = pull(program, server=proxy.base_url)
        by_type = dict(proxy.stats.by_type)
    assert code == 0 and summary["clinical_participants"] == 1
    # One consenting participant: one newest-first search of one per code (HbA1c, blood pressure, and the weight
    # a goal targets; the steps goal has no EHR value: not searched), one for appointments.
    assert by_type["Observation"] == 3 and by_type["Appointment"] == 1
    path = Path(summary["clinical_file"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (facts,) = read_csv(path)
    assert (facts["enrollment_id"], facts["hba1c"], facts["hba1c_date"]) == (enrollment, "7.6 %", "2026-11-20")
    observation = facts["hba1c_observation"]  # what the program may name as a goal's outcome_observation
    assert observation.startswith("Observation/")
    assert requests.get(f"{program.base_url}/{observation}", timeout=60).json()["valueQuantity"]["value"] == 7.6
    assert facts["blood_pressure"] == "128/82 mm[Hg]" and facts["blood_pressure_date"] == "2026-12-01"
    assert facts["upcoming_appointments"].startswith("2027-01-12")
    assert facts["goal_targets"] == ("G-A1C: latest 7.6 % on 2026-11-20; target < 7 %; "
                                     "G-KG: latest 91.2 kg on 2026-11-21; target <= 88 kg")


def test_no_patient_data_in_ledger_logs_metrics_or_status(program: Program, clinic: Clinic) -> None:
    """A pull with everything on (consent, clinical facts, a CBO's free text, a skipped referral, metrics), its
    logs written to a file as a scheduler would, at -v in text and JSON: the simulator's names, phones and MRNs and
    the organization's free text are in none of the logs, metrics, status or the ledger (and its -wal)."""
    from reliability import phi

    for n in range(2):
        clinic.refer(clinic.patient(mrn=f"MRN-PHI{n}-{program.program_id}"))
    clinic.refer(clinic.patient(mrn=None))
    enrollment = demo_enrollments()[0]
    patient_id = _patient_id(program, enrollment)
    clinic.a1c(patient_id, 7.9, "2026-11-20")
    rows = read_csv(program.inputs / "enrollments.csv")
    for row in rows:
        if row["enrollment_id"] == enrollment:
            row["clinical_consent"] = "yes"
    write_csv(program.inputs / "enrollments.csv", rows)
    org_text = ["Client Rosa prefers Tuesday pickups at the Eastside pantry", "Enrolled in WIC by caseworker Mariela"]
    cbo_sets_status(clinic, referral_task_ids(program)["R0002"], "completed", reason=org_text[0], output=org_text[1])
    with program.config.open("a", encoding="utf-8") as handle:
        handle.write('clinical_facts = true\n[output]\nmetrics_file = "state/metrics.prom"\n')
    logs = program.root / "logs"
    logs.mkdir()
    codes = []
    for n, fmt in enumerate(("text", "json")):
        code, summary, stderr = pull(program, "-v", "--log-format", fmt)
        (logs / f"pull-{n}.log").write_text(stderr, encoding="utf-8")
        codes.append(code)
    assert codes[0] == 65  # the Patient without an MRN was skipped
    assert summary["clinical_participants"] == 1 and summary["clinical_requests"] == 3  # HbA1c, BP, appointments
    assert intake_rows(program)
    status = "".join(subprocess.run([sys.executable, "-m", "connector.cli", "status", "--config",
                                     str(program.config), *args], capture_output=True, text=True,
                                    timeout=120).stdout for args in ((), ("--json",)))
    ledger = program.settings().sync.ledger
    metrics = sorted(ledger.parent.glob("metrics*.prom"))
    assert [m.name for m in metrics] == ["metrics-pull.prom"]  # pull's own file (no sync ran with metrics on)
    secrets = {"name": [*clinic.names, "Ruiz"], "phone": clinic.phones, "mrn": clinic.mrns, "note": org_text}
    assert all(secrets.values())
    artifacts = {**{f"log {p.name}": p.read_text(encoding="utf-8") for p in sorted(logs.glob("*.log"))},
                 "status": status, "summary": json.dumps(summary),
                 **{m.name: m.read_text(encoding="utf-8") for m in metrics}}
    for suffix in ("", "-wal"):
        path = Path(f"{ledger}{suffix}")
        if path.exists():
            artifacts[f"ledger{suffix}"] = path.read_bytes().decode("utf-8", "replace")
    hits = [h for where, text in artifacts.items() for h in phi.scan_values(where, text, secrets)]
    assert not hits, f"{len(hits)} patient data hit(s): " + "; ".join(f"{h.where}: {h.category}" for h in hits[:10])
    # the scanner finds what it looks for (positive controls: the 0600 PHI files hold them by design)
    assert phi.scan_values("intake", "".join(p.read_text(encoding="utf-8") for p in
                                             program.settings().intake_dir().glob("*.csv")), secrets)
    assert phi.scan_values("referrals", Path(summary["referrals_report"]).read_text(encoding="utf-8"),
                           {"note": org_text})


def enroll(program: Program, task_id: str, mrn: str, enrollment_id: str, status: str = "active",
           end_date: str = "") -> None:
    """The program's export gains (or updates) the enrollment that answers a clinic referral."""
    rows = [r for r in read_csv(program.inputs / "enrollments.csv") if r["enrollment_id"] != enrollment_id]
    supporter = rows[0]["supporter_id"]
    rows.append({**{k: "" for k in rows[0]}, "enrollment_id": enrollment_id, "mrn": mrn, "start_date": "2026-12-01",
                 "end_date": end_date, "status": status, "supporter_id": supporter, "clinic_referral": task_id})
    write_csv(program.inputs / "enrollments.csv", rows)


def history(program: Program, task_id: str) -> list[str]:
    bundle = requests.get(f"{program.base_url}/Task/{task_id}/_history", timeout=60).json()
    return [e["resource"]["status"] for e in reversed(bundle["entry"])]


def test_an_enrollment_answers_the_clinic_referral_on_the_server(program: Program, clinic: Clinic) -> None:
    mrn = f"MRN-A-{program.program_id}"
    referral = clinic.refer(clinic.patient(mrn=mrn))
    declined = clinic.refer(clinic.patient(mrn=f"MRN-D-{program.program_id}"))
    assert pull(program)[0] == 0
    enroll(program, referral["id"], mrn, "E9001")
    enroll(program, declined["id"], f"MRN-D-{program.program_id}", "E9002", status="declined")
    summary = program.sync()
    assert summary.counts["clinic_tasks_updated"] == 3  # accepted + in-progress; cancelled
    accepted = task(program, referral["id"])
    assert accepted["status"] == "in-progress"
    assert history(program, referral["id"]) == ["requested", "received", "accepted", "in-progress"]
    careplan_ref = accepted["output"][0]["valueReference"]["reference"]
    careplan = requests.get(f"{program.base_url}/{careplan_ref}", timeout=60).json()
    assert careplan["supportingInfo"] == [{"reference": referral["focus"]["reference"]}]
    refused = task(program, declined["id"])
    assert refused["status"] == "cancelled"  # the participant declined: not the program's decision (SDOH CC)
    assert [c["code"] for c in refused["statusReason"]["coding"]] == ["participant-declined", "1296859006"]

    assert program.sync().counts["clinic_tasks_updated"] == 0  # nothing changed: nothing written

    # The enrollment ends; meanwhile the EHR edits the Task (a version bump between peersync's read and write).
    enroll(program, referral["id"], mrn, "E9001", status="completed", end_date="2026-12-02")
    edited = threading.Event()

    def hook(_index: int, when: str, method: str) -> str | None:
        if method == "PUT" and when == "before-forward" and not edited.is_set():
            edited.set()
            current = task(program, referral["id"])
            current["note"] = [{"text": "Seen in clinic 2026-12-02"}]
            clinic.update(current)
        return None

    with FaultProxy(program.base_url, hook=hook) as proxy:
        summary = program.sync(server={"base_url": proxy.base_url})
    assert edited.is_set() and summary.counts["clinic_tasks_updated"] == 1
    done = task(program, referral["id"])
    assert done["status"] == "completed" and done["note"] == [{"text": "Seen in clinic 2026-12-02"}]
    assert [o.get("valueString") for o in done["output"]][-1].endswith("goal(s) achieved")
