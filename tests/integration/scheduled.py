"""A small program run the way a scheduler runs it: the real `peersync` CLI in a subprocess, with a config file,
a metrics file and JSON logs. Shared by the alert-rule and scheduled-operation tests.

The program is tiny on purpose (one supporter, a few participants, a few contacts): these tests are about what an
unattended run reports, not about mapping, so each run takes a second or two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from connector.ops.metrics import parse_samples

SUPPORTERS = """staff_id,given_name,family_name,title,organization,phone,email,npi,active
S001,Ana,Prueba,CHW,Test Health Center,(312) 555-0100,a.prueba@example.org,,yes
"""
ENROLLMENTS_HEADER = "enrollment_id,participant_id,mrn,start_date,end_date,status,supporter_id,conditions\n"
CONTACTS_HEADER = ("contact_id,enrollment_id,supporter_id,contact_datetime,duration_minutes,mode,setting,outcome,"
                   "support_types,essential_elements,goal_ids,notes,group_session_id,planned_contact_id,void\n")
BAD_DATE = "2026-02-30 10:00"  # rejected: not a date


def enrollment_row(number: int) -> str:
    return f"E{number:04d},PT{number:04d},MRN{number:04d},2026-03-0{number % 9 + 1},,active,S001,E11.9\n"


def contact_row(number: int, participant: int, when: str = "2026-03-12 11:35") -> str:
    return f"C{number:04d},E{participant:04d},S001,{when},30,phone,home,completed,emotional,,,Call {number}.,,,\n"


@dataclass
class Run:
    """One `peersync sync` as a scheduler sees it: exit code, metrics file, JSON log lines, the summary line
    (None when the run never started: a configuration that does not load has only its error line on stderr)."""

    exit_code: int
    metrics_text: str
    logs: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def metrics(self) -> dict[str, float]:
        return parse_samples(self.metrics_text)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs if line.get("event") == name]


@dataclass
class ScheduledProgram:
    """A program folder: inputs/, peersync.toml, state/ (ledger), metrics/peersync.prom."""

    root: Path
    base_url: str
    program_id: str
    mrn_system: str

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def config(self) -> Path:
        return self.root / "peersync.toml"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics" / "peersync.prom"

    def write_config(self, base_url: str | None = None, extra: str = "") -> None:
        """The production-style settings of a scheduled run (no retries to wait for in a test)."""
        self.base_url = base_url or self.base_url
        self.config.write_text(f"""
[source]
profile = "peersync-template"
inputs = ["inputs"]
[program]
id = "{self.program_id}"
mrn_system = "{self.mrn_system}"
[server]
base_url = "{self.base_url}"
[auth]
mode = "none"
[sync]
ledger = "state/ledger.sqlite"
retry_attempts = 0
backoff_factor = 0.05
backoff_max_seconds = 0.2
{extra}
[output]
metrics_file = "metrics/peersync.prom"
""", encoding="utf-8")

    def write_inputs(self, participants: int, contacts: list[str]) -> None:
        """Replace the drop folder's files: participants 1..N and the given contact rows."""
        self.inputs.mkdir(exist_ok=True)
        (self.inputs / "supporters.csv").write_text(SUPPORTERS, encoding="utf-8")
        (self.inputs / "enrollments.csv").write_text(
            ENROLLMENTS_HEADER + "".join(enrollment_row(n) for n in range(1, participants + 1)), encoding="utf-8")
        (self.inputs / "contacts.csv").write_text(CONTACTS_HEADER + "".join(contacts), encoding="utf-8")

    def empty_inputs(self) -> None:
        """The export job left the drop folder empty."""
        for path in self.inputs.iterdir():
            path.unlink()

    def load_patients(self, count: int, base_url: str | None = None) -> None:
        """The clinic's Patients MRN0001..MRN{count} under this program's MRN system (conditional: no duplicates)."""
        entries = [{
            "resource": {"resourceType": "Patient", "identifier": [{"system": self.mrn_system, "value": f"MRN{n:04d}"}],
                         "name": [{"family": f"Prueba{n}", "given": ["Test"]}], "birthDate": "1960-01-01"},
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={self.mrn_system}|MRN{n:04d}"},
        } for n in range(1, count + 1)]
        response = requests.post(base_url or self.base_url,
                                 json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                                 headers={"Content-Type": "application/fhir+json"}, timeout=120)
        response.raise_for_status()

    def peersync(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The real CLI in a subprocess, in the program folder, with no PEERSYNC_* from the test's environment."""
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PEERSYNC_")}
        env["PEERSYNC_SECRETS_DIR"] = ""
        return subprocess.run([sys.executable, "-m", "connector.cli", *args], capture_output=True, text=True,
                              env=env, cwd=self.root, timeout=300, check=False)

    def sync(self, *args: str) -> Run:
        """`peersync sync --log-format json` as the crontab example runs it."""
        result = self.peersync("sync", "--config", str(self.config), "--log-format", "json", *args)
        logs = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
        stdout_lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        summaries = [line for line in stdout_lines if line.get("event") == "run-summary"]
        assert len(summaries) <= 1 and len(stdout_lines) == len(summaries), f"stdout: {result.stdout!r}"
        return Run(result.returncode, self.metrics_file.read_text(encoding="utf-8"), logs,
                   summaries[0] if summaries else None)


def new_program(root: Path, base_url: str) -> ScheduledProgram:
    """A program with its own id and MRN system (so it shares the server with other tests safely)."""
    root.mkdir(parents=True, exist_ok=True)
    program = ScheduledProgram(root, base_url, "s" + uuid.uuid4().hex[:10],
                               f"urn:oid:2.16.840.1.113883.3.9999.{uuid.uuid4().int % 10**9}")
    program.write_config()
    return program
