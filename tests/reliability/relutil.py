"""Helpers for the reliability suite: isolated (optionally trimmed) demo programs behind a proxy, the peersync
CLI as a subprocess, convergence loops, and the invariant checks (no duplicates, nothing lost, content equal to
a clean sync, ledger consistent with the server).

The invariant every scenario ends with (:func:`check_invariant`):

* every business identifier of the program matches exactly one resource on the server (no duplicates);
* the per-type counts equal what a clean sync of the same inputs produces (nothing lost, nothing extra);
* the content of every resource equals that of a clean sync of the same inputs into a fresh program id
  (statuses, descriptions, notes, references..., after replacing program-specific ids);
* the ledger marks nothing sent that the server does not hold under the id the ledger recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from integration.syncutil import (
    DEMO,
    Program,
    assert_clean_state,
    demo_enrollments,
    demo_summary,
    expected_identities,
    make_program,
    read_csv,
    server_resources,
    trim_inputs,
    write_csv,
)

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SITE_DIR = HERE / "site"  # sitecustomize for subprocesses: loopback-only network guard and test hooks
DEMO_TEMPLATE = DEMO / "template"
SUMMARY = demo_summary()
REVIEW = frozenset(SUMMARY["unmatched_enrollments"]) | frozenset(SUMMARY["ambiguous_enrollments"])
BAD_ENROLLMENTS = frozenset(r["record_id"] for r in SUMMARY["bad_rows"] if r["kind"] == "enrollment")
DEFAULT_SEED = 20260801


# -- seeds and run counts ---------------------------------------------------------------------------------------------


def base_seed() -> int:
    """The suite's seed (PEERSYNC_RELIABILITY_SEED), from which every scenario derives its own."""
    return int(os.environ.get("PEERSYNC_RELIABILITY_SEED") or DEFAULT_SEED)


def seed_for(name: str) -> int:
    """A stable per-scenario seed derived from the suite seed and the scenario name."""
    digest = hashlib.sha256(f"{base_seed()}:{name}".encode()).hexdigest()
    return int(digest[:12], 16)


def runs(default: int) -> int:
    """How many seeded runs a multi-run scenario makes: PEERSYNC_RELIABILITY_RUNS, else ``default``."""
    value = os.environ.get("PEERSYNC_RELIABILITY_RUNS", "").strip()
    return max(1, int(value)) if value else default


def scenario_name(base: str, n: int, default: int) -> str:
    """A multi-run scenario's name in the results: ``base`` at the default count, ``base-N-runs`` otherwise (so a
    long PEERSYNC_RELIABILITY_RUNS variant and the normal run both stay in the report)."""
    return base if n == default else f"{base}-{n}-runs"


def is_loopback_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


# -- programs ---------------------------------------------------------------------------------------------------------


def trimmed_set(participants: int) -> set[str]:
    """The first ``participants`` demo enrollments plus both review cases and the bad-MRN row."""
    return set(demo_enrollments()[:participants]) | set(REVIEW) | set(BAD_ENROLLMENTS)


@dataclass
class RelProgram:
    """An isolated demo program (its own program id and MRN system) and how its sync is configured."""

    program: Program
    server_url: str  # what peersync talks to (a proxy, or the server itself)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    review: frozenset[str] = REVIEW

    @property
    def root(self) -> Path:
        return self.program.root

    @property
    def config(self) -> Path:
        return self.program.config

    @property
    def ledger(self) -> Path:
        return self.program.root / "state" / "ledger.sqlite"

    def write_config(self, server_url: str | None = None, **sections: dict[str, Any]) -> None:
        """(Re)write the TOML config, pointing at ``server_url`` with extra settings per section."""
        if server_url is not None:
            self.server_url = server_url
        for section, values in sections.items():
            self.settings.setdefault(section, {}).update(values)
        base = {
            "source": {"profile": "peersync-template", "inputs": ["inputs"]},
            "program": {"id": self.program.program_id, "mrn_system": self.program.mrn_system},
            "server": {"base_url": self.server_url, "timeout_seconds": 10},
            "sync": {"ledger": "state/ledger.sqlite", "concurrency": 4, "backoff_factor": 0.05,
                     "backoff_max_seconds": 0.5, "retry_after_cap_seconds": 2},
            "output": {"metrics_file": "state/metrics.prom"},
        }
        for section, values in self.settings.items():
            base.setdefault(section, {}).update(values)
        lines: list[str] = []
        for section, values in base.items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def sync(self, **overrides: Any) -> Any:
        """One in-process sync (returns the RunSummary; raises what the run raises)."""
        return self.program.sync(**overrides)

    def sync_code(self, **overrides: Any) -> tuple[int, Any]:
        """One in-process sync: (exit code as the CLI would give it, the summary or the error)."""
        from connector.errors import PeersyncError

        try:
            summary = self.program.sync(**overrides)
        except PeersyncError as exc:
            return int(exc.exit_code), exc
        return summary.exit_code, summary


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def new_program(tmp_path: Path, fhir_base_url: str, *, server_url: str | None = None, participants: int | None = None,
                **sections: dict[str, Any]) -> RelProgram:
    """A fresh isolated demo program (trimmed to ``participants`` enrollments if given) whose sync talks to
    ``server_url`` (default: the server itself). Patients are loaded directly into the server."""
    program = make_program(tmp_path, fhir_base_url)
    review = REVIEW
    if participants is not None:
        keep = trimmed_set(participants)
        trim_inputs(program.inputs, keep)
        review = frozenset(REVIEW & keep)
    rel = RelProgram(program, server_url or fhir_base_url, review=review)
    rel.write_config(**sections)
    return rel


# -- the peersync CLI as a subprocess ---------------------------------------------------------------------------------


def cli_env(extra: dict[str, str] | None = None, guard_log: Path | None = None) -> dict[str, str]:
    """Environment for a peersync subprocess: the loopback-only network guard on, no inherited overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERSYNC_") or k.startswith("PEERSYNC_RELIAB")}
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                      else []))
    env["PEERSYNC_NETGUARD"] = "1"
    if guard_log is not None:
        env["PEERSYNC_NETGUARD_LOG"] = str(guard_log)
    env.update(extra or {})
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "connector.cli", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m connector.cli ARGS`` and return the completed process (stdout/stderr as text)."""
    return subprocess.run(cli_command(*args), env=env or cli_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO)


def assert_no_traceback(proc: subprocess.CompletedProcess[str] | str) -> None:
    text = proc if isinstance(proc, str) else proc.stderr + proc.stdout
    assert "Traceback (most recent call last)" not in text, f"a traceback escaped:\n{text[-4000:]}"


# -- convergence ------------------------------------------------------------------------------------------------------

DONE_CODES = (0, 65)  # everything landed that can land (65: the demo's bad rows and review cases)


def converge(step: Callable[[int], int], *, max_runs: int = 15, max_seconds: float = 300) -> list[int]:
    """Call ``step(attempt)`` (one sync, returning its exit code) until it reports done; bounded in count and time.

    Returns the exit codes of every run. Raises AssertionError when it does not converge.
    """
    codes: list[int] = []
    deadline = time.monotonic() + max_seconds
    for attempt in range(1, max_runs + 1):
        code = step(attempt)
        codes.append(code)
        if code in DONE_CODES:
            return codes
        assert code in (69,), f"run {attempt} ended with exit code {code} (expected 0/65, or 69 under faults)"
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"did not converge in {len(codes)} runs: exit codes {codes}")


# -- the invariant ----------------------------------------------------------------------------------------------------

_REF = re.compile(r"^([A-Za-z]+)/([A-Za-z0-9.\-]+)$")


def normalized_content(program: Program, found: dict[tuple[str, str], list[dict[str, Any]]] | None = None
                       ) -> dict[tuple[str, str], Any]:
    """(type, kind|value) -> the resource with everything program-specific replaced by placeholders: server ids
    and versions dropped, literal references replaced by the target's business identity, the program id and
    MRN system replaced. Two clean syncs of the same inputs into different program ids normalise equal."""
    found = found if found is not None else server_resources(program)
    by_id: dict[str, str] = {}
    for (resource_type, key), resources in found.items():
        for resource in resources:
            by_id[f"{resource_type}/{resource['id']}"] = f"{resource_type}#{key}".replace(program.program_id,
                                                                                       "<program>")
    for patient in program_patients(program):
        mrns = [i.get("value") for i in patient.get("identifier", []) if i.get("system") == program.mrn_system]
        by_id[f"Patient/{patient['id']}"] = f"Patient#mrn|{','.join(sorted(mrns))}|{patient.get('birthDate')}"

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "meta" or (key == "id" and "resourceType" in node):
                    continue
                if key == "reference" and isinstance(value, str):
                    match = _REF.match(value)
                    if match and value in by_id:
                        value = by_id[value]
                out[key] = fix(value)
            return out
        if isinstance(node, list):
            return [fix(v) for v in node]
        if isinstance(node, str):
            return node.replace(program.program_id, "<program>").replace(program.mrn_system, "<mrn-system>")
        return node

    return {(key[0], key[1].replace(program.program_id, "<program>")): [fix(r) for r in resources]
            for key, resources in found.items()}


def program_patients(program: Program) -> list[dict[str, Any]]:
    """The Patients loaded for a program (under its own MRN system)."""
    from connector.identifiers import token_query

    url: str | None = f"{program.base_url}/Patient?identifier={token_query(program.mrn_system, '')}&_count=500"
    patients: list[dict[str, Any]] = []
    for _page in range(20):
        if not url:
            break
        bundle = requests.get(url, timeout=120).json()
        patients += [e["resource"] for e in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return patients


def content_differences(actual: dict[tuple[str, str], Any], expected: dict[tuple[str, str], Any],
                        limit: int = 5) -> list[str]:
    """Human-readable differences between two normalised contents (at most ``limit``)."""
    diffs: list[str] = []
    for key in sorted(set(actual) | set(expected)):
        a, e = actual.get(key), expected.get(key)
        if a != e:
            diffs.append(f"{key}: {_first_diff(a, e)}")
            if len(diffs) >= limit:
                break
    return diffs


def _first_diff(a: Any, e: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(e, dict):
        for key in sorted(set(a) | set(e)):
            if a.get(key) != e.get(key):
                return _first_diff(a.get(key), e.get(key), f"{path}.{key}")
    if isinstance(a, list) and isinstance(e, list) and len(a) == len(e):
        for i, (x, y) in enumerate(zip(a, e, strict=True)):
            if x != y:
                return _first_diff(x, y, f"{path}[{i}]")
    return f"{path or '<root>'}: got {str(a)[:160]!r}, clean sync has {str(e)[:160]!r}"


def ledger_inconsistencies(ledger: Path, found: dict[tuple[str, str], list[dict[str, Any]]],
                           program: Program) -> list[str]:
    """Rows the ledger holds as confirmed that the server does not hold under that id (must be none)."""
    if not ledger.exists():
        return []
    ctx = program.context()
    system_kind = {ctx.system(k): k for k in (
        "organization", "cbo", "device", "staff", "role", "careteam", "careplan", "goal", "contact",
        "contact-request", "referral", "referral-task")}
    problems: list[str] = []
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
        rows = db.execute("""SELECT r.resource_type, r.system, r.value, r.server_id, u.state FROM resources r
                             LEFT JOIN units u ON u.unit_key = r.unit_key WHERE r.server_id IS NOT NULL""").fetchall()
        sent_without_resources = db.execute(
            """SELECT count(*) FROM units u WHERE u.state='sent' AND u.voided=0 AND u.hash != 'deleted'
               AND u.kind IN ('goal','contact','planned_contact','referral','enrollment')
               AND NOT EXISTS (SELECT 1 FROM resources r WHERE r.unit_key=u.unit_key)""").fetchone()[0]
    for resource_type, system, value, server_id, state in rows:
        kind = system_kind.get(system)
        if kind is None:
            continue  # a retired identifier system (records moved to another patient)
        on_server = [r["id"] for r in found.get((resource_type, f"{kind}|{value}"), [])]
        if server_id not in on_server:
            problems.append(f"ledger has {resource_type}/{server_id} ({state}) for an identifier the server holds "
                            f"as {on_server or 'nothing'}")
    if sent_without_resources:
        problems.append(f"{sent_without_resources} units marked sent with no confirmed resources")
    return problems


@dataclass
class Verdict:
    """What the invariant check measured for one program."""

    sent: int  # business-identifier resources on the server
    duplicates: int  # identifiers matching more than one resource, and change-sets with more than one Provenance
    lost: int  # resources a clean sync has that are missing here
    extra: int  # resources here that a clean sync does not have
    content_mismatches: int
    ledger_problems: int
    details: list[str] = field(default_factory=list)
    found: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.lost or self.extra or self.content_mismatches or self.ledger_problems)


def measure(rel: RelProgram, reference: dict[tuple[str, str], Any] | None,
            found: dict[tuple[str, str], list[dict[str, Any]]] | None = None) -> Verdict:
    """Measure the invariant for a program (see the module docstring); ``reference``: a clean sync's content."""
    program = rel.program
    found = found if found is not None else server_resources(program)
    duplicates = {k: len(v) for k, v in found.items() if len(v) != 1}
    duplicates.update({("Provenance", code): n for code, n in provenance_duplicates(program).items()})
    expected = expected_identities(program, set(rel.review))
    by_type: dict[str, int] = {}
    for key in found:
        by_type[key[0]] = by_type.get(key[0], 0) + 1
    lost = sum(max(0, n - by_type.get(t, 0)) for t, n in expected.items())
    extra = sum(max(0, n - expected.get(t, 0)) for t, n in by_type.items())
    details = [f"duplicates: {dict(list(duplicates.items())[:5])}"] if duplicates else []
    if lost or extra:
        details.append(f"server {dict(sorted(by_type.items()))} != expected {dict(sorted(expected.items()))}")
    mismatches: list[str] = []
    if reference is not None:
        actual = normalized_content(program, found)
        mismatches = [k for k in set(actual) | set(reference) if actual.get(k) != reference.get(k)]
        details += content_differences(actual, reference)
    ledger_problems = ledger_inconsistencies(rel.ledger, found, program)
    details += ledger_problems[:5]
    return Verdict(sent=len(found), duplicates=len(duplicates), lost=lost, extra=extra,
                   content_mismatches=len(mismatches), ledger_problems=len(ledger_problems), details=details,
                   found=found)


def check_invariant(rel: RelProgram, reference: dict[tuple[str, str], Any] | None) -> Verdict:
    """Measure, then assert the invariant (also with syncutil.assert_clean_state)."""
    found = assert_clean_state(rel.program, set(rel.review))
    verdict = measure(rel, reference, found)
    assert verdict.ok, "invariant broken:\n  " + "\n  ".join(verdict.details)
    return verdict


def versions(program: Program) -> dict[tuple[str, str], list[str]]:
    """(type, kind|value) -> the versionIds on the server (to prove a failed run wrote nothing)."""
    return {k: sorted(r["meta"]["versionId"] for r in v) for k, v in server_resources(program).items()}


def provenance_duplicates(program: Program) -> dict[str, int]:
    """Change-set codes (meta.tag) that more than one of the program's Provenances carry: every Provenance is a
    conditional create on its change-set tag, so a replayed change-set must find the first one."""
    ctx = program.context()
    tag_system = f"{ctx.meta_source}/change-set"
    per_code: dict[str, int] = {}
    untagged = 0
    url: str | None = f"{program.base_url}/Provenance?_source={ctx.meta_source}&_elements=meta&_count=500"
    while url:
        bundle = requests.get(url, timeout=120).json()
        for entry in bundle.get("entry", []):
            codes = [t.get("code") for t in entry["resource"].get("meta", {}).get("tag", [])
                     if t.get("system") == tag_system]
            if not codes:
                untagged += 1
            for code in codes:
                per_code[code] = per_code.get(code, 0) + 1
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    duplicates = {code: n for code, n in per_code.items() if n > 1}
    if untagged:
        duplicates["(no change-set tag)"] = untagged  # a Provenance posted without its condition
    return duplicates


def provenance_count(program: Program) -> int:
    ctx = program.context()
    url = f"{program.base_url}/Provenance?_source={ctx.meta_source}&_summary=count"
    return int(requests.get(url, timeout=60).json().get("total", 0))


def ledger_rows(ledger: Path, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5) as db:
        return db.execute(sql, tuple(args)).fetchall()


__all__ = [
    "REPO",
    "REVIEW",
    "SUMMARY",
    "RelProgram",
    "Verdict",
    "assert_no_traceback",
    "check_invariant",
    "cli_command",
    "cli_env",
    "converge",
    "is_loopback_url",
    "measure",
    "new_program",
    "normalized_content",
    "read_csv",
    "run_cli",
    "runs",
    "seed_for",
    "versions",
    "write_csv",
]
