"""Peak memory (RSS) of ``peersync plan`` and ``peersync map`` as the number of contact rows grows.

Each command runs as a child process (``python -m connector.cli ...``, forked from a small launcher); its peak
RSS is the ``ru_maxrss`` that ``os.wait4`` returns for that child alone. The participants stay the same (memory
may grow with them: one CarePlan lists a participant's goals); only the contact rows grow, 10k -> 100k -> 1M.
``plan`` reads into staging and diffs against an empty ledger (a first sync's plan); ``map`` writes every resource
to disk.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass

from .common import Dataset, new_program, run_for_peak_rss, work_dir

CLI = [sys.executable, "-m", "connector.cli"]


@dataclass
class MemoryResult:
    command: str
    contacts: int
    rows: int
    exit_code: int
    seconds: float
    peak_rss_kib: int


def measure(data: Dataset) -> list[MemoryResult]:
    """Peak RSS of ``plan`` and ``map`` over one data set."""
    results = []
    # plan: a config with a fresh (empty) ledger; no request reaches the server
    program = new_program(data, "http://127.0.0.1:9/fhir", "mem", load=False)
    code, seconds, rss = run_for_peak_rss([*CLI, "plan", "--config", str(program.config), "--json", "-q"],
                                          log=program.root / "plan.log")
    results.append(MemoryResult("plan", data.contacts, data.rows, code, seconds, rss))
    out = work_dir() / "map-out" / data.path.name
    shutil.rmtree(out, ignore_errors=True)
    code, seconds, rss = run_for_peak_rss([*CLI, "map", "--profile", "peersync-template", str(data.path),
                                           "--out", str(out), "-q"], log=program.root / "map.log")
    results.append(MemoryResult("map", data.contacts, data.rows, code, seconds, rss))
    shutil.rmtree(out, ignore_errors=True)  # a million resources on disk are not worth keeping
    shutil.rmtree(program.root, ignore_errors=True)
    return results
