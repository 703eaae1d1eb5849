"""Shared pieces of the benchmark scripts: data sets, isolated programs on the server, timing, the table.

Nothing here asserts a timing: the scripts measure and print. Every figure that matters is a ratio of two
measurements taken in the same run on the same machine (absolute times on a shared 2-core box are noise).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
import fhirserver  # noqa: E402 - tests/fhirserver.py, importable once tests/ is on sys.path (above)

from tests.demogen import DEFAULT_SEED, MRN_SYSTEM, generate_program  # noqa: E402 - likewise

FHIR_JSON = "application/fhir+json"
HEADERS = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}


def work_dir() -> Path:
    """Where data sets, ledgers and outputs go (PEERSYNC_BENCH_DIR, default .peersync/bench; git-ignored)."""
    path = Path(os.environ.get("PEERSYNC_BENCH_DIR") or REPO / ".peersync" / "bench")
    path.mkdir(parents=True, exist_ok=True)
    return path


def quiet_logs() -> None:
    """Sync logs warnings for the participants the demo deliberately sends to review: keep them off the table."""
    logging.getLogger("connector").setLevel(logging.ERROR)


# -- data sets ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A generated program (template CSVs) and its generation summary."""

    path: Path
    participants: int
    contacts: int
    summary: dict[str, Any]

    @property
    def rows(self) -> int:
        """Valid source rows (every kind)."""
        return sum(self.summary["counts"].values())

    @property
    def review_participants(self) -> set[str]:
        """Participants the sync sends to review by design (no matching Patient, or two)."""
        return set(self.summary["unmatched_enrollments"]) | set(self.summary["ambiguous_enrollments"])


def dataset(participants: int, contacts: int, *, seed: int = DEFAULT_SEED) -> Dataset:
    """A seeded program with exactly ``contacts`` contact rows and no bad rows, generated once and cached."""
    path = work_dir() / "data" / f"p{participants}-c{contacts}-s{seed}"
    summary_file = path / "summary.json"
    if not summary_file.is_file():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        generate_program(tmp, participants=participants, contacts=contacts, seed=seed, bad_rows=False)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return Dataset(path, participants, contacts, json.loads(summary_file.read_text(encoding="utf-8")))


# -- isolated programs on the server ------------------------------------------------------------------------------


@dataclass
class BenchProgram:
    """One measurement's program: its own program id and MRN system, config file and ledger."""

    data: Dataset
    root: Path
    inputs: Path
    config: Path
    program_id: str
    mrn_system: str
    base_url: str  # what the measured client talks to (the sync config's server.base_url)
    patient_ids: dict[str, str] = field(default_factory=dict)  # MRN -> server id of its (single) Patient
    direct_url: str | None = None  # the server itself, when base_url is a proxy in front of it

    @property
    def setup_url(self) -> str:
        """Where untimed setup goes (Patient loading, the server-bound side's program-wide bundle): the server
        itself, never through a proxy."""
        return self.direct_url or self.base_url

    def settings(self) -> Any:
        from connector.ops.config import load_settings

        return load_settings(self.config)


def new_program(data: Dataset, base_url: str, label: str, *, concurrency: int = 4, copy_inputs: bool = False,
                load: bool = True, direct_url: str | None = None) -> BenchProgram:
    """A fresh program id, MRN system, config and ledger over ``data``; its Patients loaded (not timed).

    ``base_url`` goes into the config (the server peersync syncs to); ``direct_url``, when ``base_url`` is a proxy,
    is the server behind it, where the Patients are loaded."""
    program_id = f"{label}{uuid.uuid4().hex[:8]}"
    mrn_system = f"urn:oid:2.16.840.1.113883.3.9999.{uuid.uuid4().int % 10**9}"
    root = work_dir() / "runs" / program_id
    root.mkdir(parents=True, exist_ok=True)
    inputs = data.path
    if copy_inputs:
        inputs = root / "inputs"
        shutil.copytree(data.path, inputs, ignore=shutil.ignore_patterns("clinic", "summary.json"))
    config = root / "peersync.toml"
    config.write_text(
        f"""[source]
profile = "peersync-template"
inputs = ["{inputs.as_posix()}"]
[program]
id = "{program_id}"
mrn_system = "{mrn_system}"
[server]
base_url = "{base_url}"
[auth]
mode = "none"
[sync]
ledger = "state/ledger.sqlite"
concurrency = {concurrency}
""",
        encoding="utf-8",
    )
    program = BenchProgram(data, root, inputs, config, program_id, mrn_system, base_url, direct_url=direct_url)
    if load:
        load_patients(program)
    return program


def load_patients(program: BenchProgram, chunk: int = 500) -> None:
    """The clinic's Patients under the program's MRN system, in transactions of ``chunk`` (not timed)."""
    bundle = json.loads((program.data.path / "clinic" / "patients.json").read_text(encoding="utf-8"))
    old_query = quote(f"{MRN_SYSTEM}|", safe="")
    new_query = quote(f"{program.mrn_system}|", safe="")
    entries = bundle["entry"]
    for entry in entries:
        resource = entry["resource"]
        for ident in resource["identifier"]:
            if ident["system"] == MRN_SYSTEM:
                ident["system"] = program.mrn_system
        url = entry["request"]["url"]
        if url.startswith("Patient/"):
            new_id = f"{url.split('/', 1)[1]}-{program.program_id}"
            entry["request"]["url"] = f"Patient/{new_id}"
            resource["id"] = new_id
        else:
            entry["request"]["url"] = url.replace(old_query, new_query)
    with requests.Session() as session:
        for start in range(0, len(entries), chunk):
            part = entries[start:start + chunk]
            response = session.post(program.setup_url, json={"resourceType": "Bundle", "type": "transaction",
                                                             "entry": part}, headers=HEADERS, timeout=600)
            response.raise_for_status()
            for entry, answer in zip(part, response.json().get("entry", []), strict=True):
                location = answer.get("response", {}).get("location", "")
                mrn = entry["resource"]["identifier"][0]["value"]
                server_id = location.split("/")[1] if location.startswith("Patient/") else None
                if server_id:
                    # an ambiguous MRN (two Patients) is never resolved: the sync sends it to review
                    program.patient_ids[mrn] = "" if mrn in program.patient_ids else server_id


def reset_server(base_url: str) -> float:
    """Expunge everything (HAPI $expunge); returns the seconds it took."""
    started = time.perf_counter()
    fhirserver.expunge_everything(base_url, timeout=1800)
    return time.perf_counter() - started


def server_version(base_url: str) -> str:
    """The server's software name and version from its CapabilityStatement."""
    try:
        meta = requests.get(f"{base_url}/metadata", headers={"Accept": FHIR_JSON}, timeout=30).json()
        software = meta.get("software", {})
        return f"{software.get('name', '?')} {software.get('version', '?')} (FHIR {meta.get('fhirVersion', '?')})"
    except (requests.RequestException, ValueError):
        return "unknown"


# -- measuring ----------------------------------------------------------------------------------------------------


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> Self:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


# Forks the measured command from a small process. Linux counts the RSS a child had right after fork (the
# parent's pages, until exec) in its ru_maxrss: measured straight from a benchmark process holding 500 MB,
# every child would "peak" at 500 MB.
_LAUNCHER = """
import os, subprocess, sys
out = open(sys.argv[1], "wb")
process = subprocess.Popen(sys.argv[3:], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
_pid, status, usage = os.wait4(process.pid, 0)
with open(sys.argv[2], "w") as report:
    report.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def run_for_peak_rss(args: list[str], *, log: Path) -> tuple[int, float, int]:
    """Run a command as a child process; (exit code, wall seconds, its own peak RSS in KiB from wait4)."""
    report = log.with_suffix(".rusage")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", _LAUNCHER, str(log), str(report), *args], check=True,
                   stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    code, maxrss = report.read_text().split()
    return int(code), seconds, int(maxrss)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu or platform.processor(),
        "ram_gib": f"{mem_kib / 2**20:.1f}",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# -- the table ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    section: str
    measure: str
    value: str
    ratio: str = ""
    target: str = ""
    verdict: str = ""


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "MISSED")


def render(rows: Iterable[Row]) -> str:
    """A Markdown table (readable as plain text too)."""
    rows = list(rows)
    head = ("section", "measure", "value", "ratio", "target", "")
    cells = [head] + [(r.section, r.measure, r.value, r.ratio, r.target, r.verdict) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) + " |" for cell in cells[1:]]
    return "\n".join(lines)


def rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s" if seconds > 0 else "-"


def fhirserver_pid() -> int | None:
    """The pid of the local test server on PEERSYNC_FHIR_PORT (tests/fhir-server's pid file), if it runs."""
    port = os.environ.get("PEERSYNC_FHIR_PORT", "8089")
    run_dir = Path(os.environ.get("PEERSYNC_FHIR_RUN_DIR", REPO / "tests" / "fhir-server" / "target" / "run"))
    try:
        pid = int((run_dir / f"fhir-server-{port}.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def pin_process(pid: int, cpus: set[int]) -> int:
    """Set the CPU affinity of every thread of a process (Linux: affinity is per thread); the number of threads."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
            count += 1
        except (ProcessLookupError, PermissionError):
            continue  # a thread that ended meanwhile
    return count
