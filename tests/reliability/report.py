"""Write docs/reliability.md from the reliability suite's results file.

    python tests/reliability/report.py [--results .peersync/reliability-results.json] [--out docs/reliability.md]

The results file is written by the suite (tests/reliability, marker ``reliability``) at the end of each pytest
session and merged per scenario, so a long run of one scenario (PEERSYNC_RELIABILITY_RUNS=30) and a normal run of
the others end up in one report. Exit code 1 when any scenario failed or found a duplicate, a lost record or a
PHI hit (the report is written anyway).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO / ".peersync" / "reliability-results.json"
DEFAULT_OUT = REPO / "docs" / "reliability.md"

GROUPS = [
    ("Network faults (Toxiproxy)", "toxiproxy-"),
    ("HTTP faults (tests/reliability/faultproxy.py)", "http-"),
    ("Hostile server: answers that do not prove the writes, slow bodies, echoed values", "server-"),
    ("Crashes and a damaged ledger", ("crash-", "ledger-")),
    ("Concurrency", "concurrency-"),
    ("Hostile input", "hostile-"),
    ("Source shape (the export changed shape between syncs)", "shape-"),
    ("Server drift (resources deleted or edited on the server; `peersync verify`, `verify --repair`)", "drift-"),
    ("Known conditions and small defects (issue 14, items 7-10: documented exit codes, limits, private files)",
     "known-"),
    ("PHI leakage", "phi-"),
    ("Transport", "transport-"),
]

INVARIANT = """\
Every scenario that writes ends with the same check (`tests/reliability/relutil.py: check_invariant`, which also
runs `tests/integration/syncutil.py: assert_clean_state`):

- **no duplicates**: every business identifier of the program matches exactly one resource on the server, and
  every change-set (the Provenance's `meta.tag`) exactly one Provenance;
- **nothing lost, nothing extra**: the per-type counts equal what a clean sync of the same inputs produces;
- **same content**: every resource equals the one a clean sync of the same inputs wrote into a fresh program id
  (statuses, descriptions, notes, codes, references; server ids and program-specific ids normalised);
- **a truthful ledger**: nothing is marked sent that the server does not hold under the id the ledger recorded.

*Records sent* counts the program's business-identifier resources on the server at the end of each run
(summed over runs); *duplicates* counts identifiers matching more than one resource and change-sets with more
than one Provenance; *lost* counts resources
missing (or extra) against a clean sync; *PHI hits* counts sensitive fixture values found in peersync's output.
A dash means "not measured by this scenario"."""

FIXES = """\
Each was exposed by the scenario named, fixed with the smallest change, and is now covered by that scenario
and a unit test (`tests/unit/test_reliability_fixes.py`):

1. `connector/server/client.py`: a response cut off mid-body (connection reset after the headers) escaped as
   `requests.ChunkedEncodingError` and crashed the run (exit 1): requests reads bodies after urllib3's retry
   loop. Now retried within the same budget, then "server unavailable" (69). *http-faults (truncate-after-commit).*
2. `connector/write/writer.py`: once the server was marked unavailable, the remaining participants were marked pending
   through the main thread's SQLite connection from worker threads (`ProgrammingError`, exit 1). Each worker
   now uses its own staging connection for that too. *http-faults-trimmed-one-retry.*
3. `connector/plan/ledger.py`: random bytes inside the ledger's pages passed the open-time check and surfaced
   mid-run as `sqlite3.DatabaseError` (exit 1, "a bug"). The ledger now runs `PRAGMA quick_check` when opened
   (about 1 s per 400 MB) and reports damage as the documented LedgerError with its recovery path (exit 78).
   *ledger-corrupt-random-bytes-in-pages.*
4. `connector/write/writer.py`: a run that ended in an unexpected exception was recorded in the ledger (and logged) as
   "ok" with exit 0, while the process exited 1. Now recorded as failed, exit 1. *same scenario.*
5. `connector/plan/ledger.py`: on a full disk SQLite rolls the transaction back itself; the ledger's own ROLLBACK then
   failed and replaced "database or disk is full" with "cannot rollback - no transaction is active", so the
   documented disk-full message and advice never appeared. *ledger-disk-full.*
6. `connector/read/formats/csv_reader.py`: a CSV file cut off in the middle of a row (no final line break, cells
   missing) had its last row accepted with a cut note and missing columns. That row is now rejected with a
   reason ("the file ends in the middle of this row"). *hostile-input-corpus (truncated file).*
7. `connector/write/writer.py`: a Patient search the server refused with a 4xx (e.g. a 400 whose diagnostics echo the
   query) ended the whole run with exit 1, run after run. The participant now goes to the review queue
   (`patient-search-failed`, scrubbed detail) and the others land. *phi-leakage (400-echo).*
8. `connector/server/client.py`: an untrusted TLS certificate was reported as "server unreachable after retries
   (SSLError)", exit 69 (retry later, forever). Now a TransportError naming the certificate problem and
   `server.ca_bundle`, exit 78, like the token and doctor paths. *transport-self-signed.*"""


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _group_of(name: str) -> str:
    for title, prefixes in GROUPS:
        if name.startswith(prefixes):
            return title
    return "Other"


def render(data: dict[str, Any], results_path: Path) -> tuple[str, bool]:
    scenarios: dict[str, dict[str, Any]] = data.get("scenarios", {})
    machine = data.get("machine", {})
    ok = True
    lines = [
        "# Reliability and security proof",
        "",
        "<!-- Generated by tests/reliability/report.py from the suite's results file; do not edit by hand. -->",
        "",
        "Faults, crashes and hostile input, with nothing lost and nothing leaked: what the reliability suite "
        "(`tests/reliability/`, pytest marker `reliability`) did against the local HAPI FHIR server, and what it "
        "found. Regenerate after a run with `python tests/reliability/report.py`.",
        "",
        "## Where and when",
        "",
    ]
    for key, label in (("date", "report data updated"), ("hostname", "machine"), ("cpu_model", "CPU"),
                       ("cpus", "cores"), ("memory_gib", "memory (GiB)"), ("os", "OS"), ("python", "Python"),
                       ("fhir_server", "FHIR server"), ("fhir_version", "FHIR version"), ("toxiproxy", "Toxiproxy"),
                       ("git_commit", "git commit (HEAD; the working tree may hold uncommitted changes)")):
        if machine.get(key) is not None:
            lines.append(f"- {label}: {machine[key]}")
    sessions = data.get("sessions", [])
    if sessions:
        lines += ["", "Test sessions that produced these results (wall time on this machine, shared with other work):",
                  ""]
        for sess in sessions:
            lines.append(f"- {sess.get('started_at')}: `pytest {sess.get('args', '')}` — "
                         f"{sess.get('reliability_tests')} reliability tests in {sess.get('seconds')} s, "
                         f"PEERSYNC_RELIABILITY_RUNS={sess.get('PEERSYNC_RELIABILITY_RUNS')}, "
                         f"exit status {sess.get('exit_status')}")
    lines += ["", "## Summary", "",
              "| scenario | outcome | runs | faults injected | records sent | duplicates | lost | PHI hits |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    totals = {"runs": 0, "faults_injected": 0, "records_sent": 0, "duplicates": 0, "lost": 0, "phi_hits": 0}
    ordered = sorted(scenarios.values(), key=lambda s: ([t for t, _ in GROUPS].index(_group_of(s["name"]))
                                                        if _group_of(s["name"]) != "Other" else 99, s["name"]))
    for s in ordered:
        bad = s["outcome"] != "passed" or s.get("duplicates") or s.get("lost") or s.get("phi_hits") \
            or s.get("repaired") != s.get("drift_reported")  # drift reported but not all of it repaired
        ok = ok and not bad
        for key in totals:
            totals[key] += s.get(key) or 0
        lines.append(f"| [{s['name']}](#{s['name']}) | {'**' + s['outcome'] + '**' if bad else s['outcome']} | "
                     f"{_fmt(s.get('runs'))} | {_fmt(s.get('faults_injected'))} | {_fmt(s.get('records_sent'))} | "
                     f"{_fmt(s.get('duplicates'))} | {_fmt(s.get('lost'))} | {_fmt(s.get('phi_hits'))} |")
    lines.append(f"| **total** | {'all passed' if ok else '**FAILURES**'} | {totals['runs']:,} | "
                 f"{totals['faults_injected']:,} | {totals['records_sent']:,} | {totals['duplicates']:,} | "
                 f"{totals['lost']:,} | {totals['phi_hits']:,} |")
    lines += ["", "## The invariant", "", INVARIANT, ""]
    current = None
    for s in ordered:
        group = _group_of(s["name"])
        if group != current:
            lines += [f"## {group}", ""]
            current = group
            lines += _drift_table([t for t in ordered if _group_of(t["name"]) == group])
        lines += [f"### {s['name']}", "", f"**{s['title']}** — {s['outcome']}, {s.get('duration_s', 0)} s, "
                                          f"finished {s.get('finished_at', '?')}", ""]
        facts = [f"runs: {_fmt(s.get('runs'))}", f"faults injected: {_fmt(s.get('faults_injected'))}",
                 f"records sent: {_fmt(s.get('records_sent'))}", f"duplicates: {_fmt(s.get('duplicates'))}",
                 f"lost: {_fmt(s.get('lost'))}", f"content mismatches: {_fmt(s.get('content_mismatches'))}",
                 f"PHI hits: {_fmt(s.get('phi_hits'))}"]
        if s.get("drift_reported") is not None:
            facts += [f"drift reported by verify: {_fmt(s['drift_reported'])}",
                      f"repaired: {_fmt(s.get('repaired'))}"]
        lines.append("- " + "; ".join(facts))
        if s.get("faults_by_kind"):
            lines.append("- faults by kind: " + ", ".join(f"{k} {v:,}" for k, v in s["faults_by_kind"].items()))
        lines += [f"- {note}" for note in s.get("notes", [])]
        if s.get("seed") is not None:
            lines.append(f"- seed: {s['seed']}")
        lines += ["- reproduce:", "", "  ```", f"  {s['command']}", "  ```", ""]
    lines += ["## Bugs the suite found (fixed)", "", FIXES, "",
              "## Running it", "",
              "- `make test` runs the suite with the short default run counts (48 tests, about 18 minutes on 2 "
              "shared cores; the sessions above give the measured times).",
              "- `make reliability` (or `PEERSYNC_RELIABILITY_RUNS=30 .venv/bin/python -m pytest -m reliability "
              "tests/reliability`) runs the multi-run scenarios 30 times each (30 seeded SIGKILL runs, 30 lock "
              "races, 30 faulted demo syncs per variant), then writes this report.",
              "- `make reliability-report` (or `python tests/reliability/report.py`) rewrites this file from the "
              "results file; scenarios are merged by name across sessions (a long variant is named "
              "`...-N-runs`).",
              "- `PEERSYNC_RELIABILITY_SEED=N` changes every scenario's seed; the seed of each scenario is above.",
              "- Toxiproxy is built from source by `tests/reliability/tools/build-toxiproxy.sh` (Go module "
              "github.com/Shopify/toxiproxy/v2, pinned) into `tests/reliability/.tools/` (not committed).",
              "- All traffic goes to 127.0.0.1: the suite refuses non-loopback servers and runs every test and "
              "every peersync subprocess under a guard that refuses and reports any other address.",
              "", f"Results file: `{_relative(results_path)}`.", ""]
    return "\n".join(lines), ok


def _drift_table(scenarios: list[dict[str, Any]]) -> list[str]:
    """For the drift scenarios: what verify reported, what the repair restored, duplicates and lost."""
    rows = [s for s in scenarios if s.get("drift_reported") is not None]
    if not rows:
        return []
    lines = ["| scenario | records reported | repaired | duplicates | lost |", "|---|---:|---:|---:|---:|"]
    lines += [f"| [{s['name']}](#{s['name']}) | {_fmt(s['drift_reported'])} | {_fmt(s.get('repaired'))} | "
              f"{_fmt(s.get('duplicates'))} | {_fmt(s.get('lost'))} |" for s in rows]
    return [*lines, ""]


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=None, help="results JSON (default: "
                        "PEERSYNC_RELIABILITY_RESULTS, else .peersync/reliability-results.json)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import os

    results = args.results or Path(os.environ.get("PEERSYNC_RELIABILITY_RESULTS") or DEFAULT_RESULTS)
    if not results.exists():
        print(f"report: no results file at {results}; run the suite first", file=sys.stderr)
        return 2
    text, ok = render(json.loads(results.read_text(encoding="utf-8")), results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"report: wrote {args.out} ({'all scenarios passed' if ok else 'FAILURES: see the report'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
