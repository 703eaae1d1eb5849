"""Known conditions and small defects (issue 14, items 7-10), each through the real CLI against the real server:
a contact naming another participant's planned contact, a quarantined record retried once its target lands,
read limits (a workbook zip bomb, an over-long CSV line) with the child's memory bounded, the documented exit
codes for a read-only ledger folder, a refused `terminology publish` or `landed` and an HTML 2xx during sync,
private operator files, no temp file after a failed metrics write, a huge Retry-After not waited for, and the
review entry of a participant whose MRN changed to an unknown one."""

from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hostile_files import xlsx_zip_bomb
from integration.syncutil import server_resources

from . import phi
from .faultproxy import FaultProxy, Schedule
from .relutil import (
    DONE_CODES,
    RelProgram,
    assert_no_traceback,
    check_invariant,
    cli_env,
    read_csv,
    run_cli,
    write_csv,
)
from .test_hostile_server import _phi_hits

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

PARTICIPANTS = 4
Answer = tuple[int, bytes, dict[str, str]]


class ScriptedProxy(FaultProxy):
    """The fault proxy with a scripted answer: ``answer(method, path, body)`` returns (status, body, headers) to
    answer a request itself, or None to forward it to the server."""

    def __init__(self, upstream: str, answer: Callable[[str, str, bytes], Answer | None]) -> None:
        self.answer = answer
        self.bodies: list[str] = []  # sha256 of every request body answered by the script
        super().__init__(upstream)

    def _handler_class(self) -> Any:
        proxy = self
        base: Any = super()._handler_class()

        class Scripted(base):  # type: ignore[misc, valid-type]
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                canned = proxy.answer(self.command, self.path, body)
                if canned is None:
                    self.rfile = io.BytesIO(body)
                    super()._handle()
                    return
                status, payload, headers = canned
                with proxy._lock:
                    proxy.stats.requests += 1
                    proxy.stats.faults[str(status)] += 1
                    proxy.bodies.append(hashlib.sha256(body).hexdigest())
                self._reply(status, payload, headers)

        return Scripted


def outcome(status: int, code: str) -> bytes:
    return json.dumps({"resourceType": "OperationOutcome",
                       "issue": [{"severity": "error", "code": code, "diagnostics": f"HAPI-0{status}"}]}).encode()


def sync(rel: RelProgram, outputs: dict[str, str], label: str, env: dict[str, str] | None = None
         ) -> tuple[int, dict[str, Any]]:
    proc = run_cli("sync", "--config", str(rel.config), "--json", env=cli_env(env), timeout=600)
    assert_no_traceback(proc)
    outputs[f"{label} (stdout)"], outputs[f"{label} (stderr)"] = proc.stdout, proc.stderr
    try:
        summary = json.loads(proc.stdout or "{}")
    except ValueError:
        summary = {}
    return proc.returncode, summary


def drain(rel: RelProgram, outputs: dict[str, str], codes: list[int], max_runs: int = 5) -> None:
    for attempt in range(max_runs):
        code, _ = sync(rel, outputs, f"healthy sync {attempt + 1}")
        codes.append(code)
        if code in DONE_CODES:
            return
        assert code == 69, f"healthy sync ended with exit {code}"
    raise AssertionError(f"did not converge: exit codes {codes}")


def rows_of(rel: RelProgram, name: str) -> list[dict[str, str]]:
    return read_csv(rel.program.inputs / name)


def rewrite(rel: RelProgram, name: str, rows: list[dict[str, str]]) -> None:
    write_csv(rel.program.inputs / name, rows)


def unit_states(rel: RelProgram) -> dict[str, str]:
    from .relutil import ledger_rows

    return {k: s for k, s in ledger_rows(rel.ledger, "SELECT unit_key, state FROM units")}


def finish(record: Callable[..., Any], rel: RelProgram, name: str, title: str, outputs: dict[str, str],
           codes: list[int], notes: list[str], reference: Any = None, faults: int = 1,
           by_kind: dict[str, int] | None = None, wrote: bool = True) -> None:
    """The closing checks every scenario shares: the invariant (when the server was written), PHI in all output."""
    hits = _phi_hits(rel, outputs) if rel.ledger.exists() else [
        h for where, text in outputs.items() for h in phi.scan(where, text, phi.PHI)]
    verdict = check_invariant(rel, reference) if wrote else None
    record(name, title, runs=len(codes), faults_injected=faults, faults_by_kind=by_kind or {},
           records_sent=verdict.sent if verdict else 0, duplicates=verdict.duplicates if verdict else 0,
           lost=(verdict.lost + verdict.extra) if verdict else 0,
           content_mismatches=verdict.content_mismatches if verdict and reference is not None else None,
           phi_hits=len(hits), notes=[f"exit codes {codes}", *notes])
    assert not hits, [str(h) for h in hits[:5]]


# -- item 7: cross-participant planned contacts; a quarantined record retried once its target lands -----------------


def test_contact_naming_another_participants_planned_contact(program_factory, record) -> None:
    rel = program_factory("known-cross-planned", participants=PARTICIPANTS)
    planned = rows_of(rel, "planned_contacts.csv")
    contacts = rows_of(rel, "contacts.csv")
    victim = contacts[0]
    foreign = next(p for p in planned if p["enrollment_id"] != victim["enrollment_id"])
    victim["planned_contact_id"] = foreign["planned_contact_id"]
    rewrite(rel, "contacts.csv", contacts)
    outputs: dict[str, str] = {}
    code, _summary = sync(rel, outputs, "sync")
    codes = [code]
    assert code == 65, outputs["sync (stderr)"][-2000:]
    rejects = next(rel.root.rglob("rejects.csv"))
    reasons = [r for r in read_csv(rejects) if r.get("field") == "planned_contact_id"]
    assert len(reasons) == 1 and reasons[0]["reason"] == "refers to a planned contact of another participant"
    found = server_resources(rel.program)
    subject_of = {f"CommunicationRequest/{r['id']}": r["subject"]["reference"]
                  for (t, _), rs in found.items() if t == "CommunicationRequest" for r in rs}
    cross = [c for (t, _), rs in found.items() if t == "Communication" for c in rs
             for ref in c.get("basedOn", []) if ref["reference"] in subject_of
             and subject_of[ref["reference"]] != c["subject"]["reference"]]
    assert not cross, f"{len(cross)} Communication(s) reference another patient's CommunicationRequest"
    code, _ = sync(rel, outputs, "second sync")
    codes.append(code)
    assert code == 65
    finish(record, rel, "known-cross-participant-planned-contact",
           "A contact naming another participant's planned contact is rejected with the reason", outputs, codes,
           [f"rejects report: `{reasons[0]['field']}`: {reasons[0]['reason']}",
            f"read back: {len(subject_of)} CommunicationRequests, 0 Communications referring across patients"],
           by_kind={"export edited": 1})


def test_quarantined_contact_is_retried_once_its_planned_contact_lands(hapi_url, program_factory, record) -> None:
    probe = program_factory("known-quarantine-retry", participants=PARTICIPANTS)
    planned = rows_of(probe, "planned_contacts.csv")
    contacts = rows_of(probe, "contacts.csv")
    target = next(p for p in planned if any(c["planned_contact_id"] == p["planned_contact_id"] for c in contacts))
    refusing = {"on": True}

    def answer(method: str, path: str, body: bytes) -> Answer | None:
        # a server rule refuses the planned contact (its CommunicationRequest) while "on"
        if not refusing["on"] or method != "POST" or not body:
            return None
        bundle = json.loads(body)
        for entry in bundle.get("entry", []):
            res = entry.get("resource", {})
            if res.get("resourceType") == "CommunicationRequest" and any(
                    i.get("value") == target["planned_contact_id"] for i in res.get("identifier", [])):
                return 422, outcome(422, "business-rule"), {}
        return None

    with ScriptedProxy(hapi_url, answer) as proxy:
        probe.write_config(server_url=proxy.base_url)
        rel = probe
        outputs: dict[str, str] = {}
        code, _ = sync(rel, outputs, "refusing sync")
        codes = [code]
        states = unit_states(rel)
        assert states[f"planned_contact:{target['planned_contact_id']}"] == "quarantined", states
        dependants = [f"contact:{c['contact_id']}" for c in contacts
                      if c["planned_contact_id"] == target["planned_contact_id"]]
        stuck = [k for k in dependants if states.get(k) != "sent"]
        assert stuck, "the contacts of the refused planned contact landed without it"
        refusing["on"] = False
        code, _summary = sync(rel, outputs, "unchanged sync")
        codes.append(code)
        # Since the write strategies (issue 15) a quarantined target that pending records wait for may be sent again
        # by itself on the next run; either way nothing is lost and the export fix below settles it.
        assert code in (0, 65) and unit_states(rel)[f"planned_contact:{target['planned_contact_id']}"] in (
            "quarantined", "sent")
        # the planned contact is fixed in the export; nothing is done about the contacts that refer to it
        for row in planned:
            if row["planned_contact_id"] == target["planned_contact_id"]:
                row["mode"] = "telephone" if row["mode"] != "telephone" else "face-to-face"
        rewrite(rel, "planned_contacts.csv", planned)
        drain(rel, outputs, codes)
        states = unit_states(rel)
        assert all(states[k] == "sent" for k in [f"planned_contact:{target['planned_contact_id']}", *stuck]), states
        faults = proxy.stats.total_faults
    finish(record, rel, "known-quarantined-retried-when-target-lands",
           "A record quarantined because its planned contact had not landed is retried by itself once it lands",
           outputs, codes, [f"{len(stuck)} contact(s) stuck behind the refused planned contact; all sent once it "
                            "was fixed in the export, without `review retry`"],
           faults=faults, by_kind={"422 on the planned contact": faults})


# -- item 8: read limits ----------------------------------------------------------------------------------------------


# Runs the CLI and, at exit, writes the process's own peak RSS (VmHWM, kB) to the file named first. VmHWM belongs to
# the memory image exec created; getrusage's ru_maxrss would carry over the forking pytest process's peak.
_MEASURED_CLI = (
    "import atexit, re, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "def peak():\n"
    "    status = open('/proc/self/status').read()\n"
    "    open(out, 'w').write(re.search(r'VmHWM:\\s+(\\d+)', status).group(1))\n"
    "atexit.register(peak)\n"
    "sys.argv[0] = 'peersync'\n"
    "runpy.run_module('connector.cli', run_name='__main__')\n"
)


def sync_measured(rel: RelProgram, outputs: dict[str, str], label: str) -> tuple[int, float]:
    """One CLI sync; (exit code, that process's own peak RSS in MB, from its VmHWM at exit)."""
    peak_file = rel.root / f"{label}.peak-kb"
    command = [sys.executable, "-c", _MEASURED_CLI, str(peak_file), "sync", "--config", str(rel.config), "--json"]
    proc = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600, check=False)
    outputs[f"{label} (stdout)"], outputs[f"{label} (stderr)"] = proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.returncode, int(peak_file.read_text()) / 1024


@pytest.mark.parametrize("case", ["xlsx-zip-bomb", "csv-long-line"])
def test_read_limits_stop_the_run_with_memory_bounded(case: str, program_factory, record) -> None:
    rel = program_factory(f"known-{case}", participants=PARTICIPANTS)
    if case == "xlsx-zip-bomb":
        bad = xlsx_zip_bomb(rel.root / "program.xlsx", unpacked_mb=1024)
        rel.write_config(source={"inputs": [str(bad)], "max_unpacked_mb": 64})
        title = "A 1 GB-unpacking workbook zip bomb (small file) stops the run with 78 naming the file"
    else:
        bad = rel.program.inputs / "contacts.csv"
        with bad.open("a", encoding="utf-8") as handle:
            handle.write("C999999,E0001," + "x" * (8 * 2**20) + "\n")
        rel.write_config(source={"max_line_kb": 1024})
        title = "A CSV line past source.max_line_kb (8 MB line, limit 1 MB) stops the run with 78 naming the file"
    outputs: dict[str, str] = {}
    code, peak = sync_measured(rel, outputs, "sync")
    text = outputs["sync (stderr)"] + outputs["sync (stdout)"]
    assert code == 78 and bad.name in text, text[-2000:]
    # a memory bound, not a time bound: far below what the file unpacks to (1 GB) or the line's 8 MB times copies
    assert peak < 400, f"the peersync process peaked at {peak:.0f} MB"
    size_kb = bad.stat().st_size // 1024
    finish(record, rel, f"known-read-limit-{case}", title, outputs, [code],
           [f"input file {size_kb:,} KB; exit 78 naming `{bad.name}`",
            f"peak RSS of the peersync process {peak:.0f} MB"],
           by_kind={case: 1}, wrote=False)


# -- item 9: documented exit codes for known conditions ---------------------------------------------------------------


def test_read_only_ledger_folder_exits_78_with_the_permission_fix(program_factory, record) -> None:
    rel = program_factory("known-read-only-ledger", participants=PARTICIPANTS)
    outputs: dict[str, str] = {}
    code, _ = sync(rel, outputs, "first sync")
    codes = [code]
    state = rel.ledger.parent
    proc = run_cli("sync", "--config", str(rel.config), env=cli_env({"PEERSYNC_RELIABILITY_READ_ONLY": str(state)}))
    assert_no_traceback(proc)
    outputs["read-only sync (stderr)"], outputs["read-only sync (stdout)"] = proc.stderr, proc.stdout
    codes.append(proc.returncode)
    check = run_cli("config", "check", "--config", str(rel.config),
                    env=cli_env({"PEERSYNC_RELIABILITY_READ_ONLY": str(state)}))
    outputs["config check (stdout)"], outputs["config check (stderr)"] = check.stdout, check.stderr
    message = proc.stderr + proc.stdout
    assert proc.returncode == 78, message[-2000:]
    assert "permission" in message.lower() or "writ" in message.lower(), message[-2000:]
    advice = re.compile(r"(?<!not )move (it|the ledger) aside", re.IGNORECASE)  # "do not move it aside" is right
    assert not advice.search(message) and not advice.search(check.stdout + check.stderr), message[-2000:]
    drain(rel, outputs, codes)
    line = next((ln.strip() for ln in message.splitlines() if "writ" in ln.lower() or "permission" in ln.lower()), "")
    finish(record, rel, "known-read-only-ledger-folder", "A read-only ledger folder exits 78 with the permission fix",
           outputs, codes, [f"message: {line.replace(str(rel.root), '<program>')[:200]}",
                            "`config check` never advises moving the ledger aside"],
           by_kind={"ledger folder not writable": 1})


@pytest.mark.parametrize("command,status,expected", [("terminology publish", 422, 65), ("landed", 405, 78)])
def test_server_refusal_outside_sync_has_its_documented_code(command: str, status: int, expected: int, hapi_url,
                                                              program_factory, record) -> None:
    def answer(method: str, path: str, body: bytes) -> Answer | None:
        if path.rstrip("/").endswith("/metadata"):
            return None
        return status, outcome(status, "not-supported" if status == 405 else "processing"), {}

    rel = program_factory(f"known-refused-{command.split()[0]}", participants=PARTICIPANTS)
    with ScriptedProxy(hapi_url, answer) as proxy:
        rel.write_config(server_url=proxy.base_url)
        proc = run_cli(*command.split(), "--config", str(rel.config))
        faults = proxy.stats.total_faults
    assert_no_traceback(proc)
    outputs = {f"{command} (stdout)": proc.stdout, f"{command} (stderr)": proc.stderr}
    assert proc.returncode == expected, (proc.returncode, proc.stderr[-1500:])
    assert faults > 0
    finish(record, rel, f"known-refused-{command.replace(' ', '-')}-{status}",
           f"`{command}` against a server answering {status} exits {expected} (documented), never 1", outputs,
           [proc.returncode], [f"server answered {status} {faults} time(s)"], faults=faults,
           by_kind={str(status): faults}, wrote=False)


def test_html_2xx_during_sync_leaves_records_pending(faultproxy, program_factory, references, record) -> None:
    proxy = faultproxy(Schedule(seed=7, rate=1.0, weights={"html-200-after-commit": 1.0},
                                methods=frozenset({"POST"})))
    rel = program_factory("known-html-200", server_url=proxy.base_url, participants=PARTICIPANTS,
                          sync={"retry_attempts": 1})
    outputs: dict[str, str] = {}
    code, summary = sync(rel, outputs, "html sync")
    codes = [code]
    faults = proxy.stats.total_faults
    assert code == 69 and summary.get("counts", {}).get("pending", 0) > 0, (code, summary.get("counts"))
    proxy.reset()
    drain(rel, outputs, codes)
    finish(record, rel, "known-html-2xx-during-sync", "A 2xx with an HTML body during sync: exit 69, records pending",
           outputs, codes, [f"first run: {summary['counts']['pending']} record(s) pending, exit 69"],
           reference=references.get(PARTICIPANTS)["content"], faults=faults, by_kind={"html-200": faults})


# -- item 10: small ones ----------------------------------------------------------------------------------------------


def test_operator_files_are_private(program_factory, references, record) -> None:
    rel = program_factory("known-private-files", participants=PARTICIPANTS)
    outputs: dict[str, str] = {}
    code, _ = sync(rel, outputs, "sync")
    modes = {}
    for label, path in (("ledger", rel.ledger), ("rejects report", next(rel.root.rglob("rejects.csv"))),
                        ("metrics file", rel.root / "state" / "metrics.prom")):
        modes[label] = stat.S_IMODE(path.stat().st_mode)
    assert all(m == 0o600 for m in modes.values()), {k: oct(v) for k, v in modes.items()}
    finish(record, rel, "known-private-operator-files", "Ledger, rejects report and metrics file are created 0600",
           outputs, [code], [", ".join(f"{k} {oct(v)}" for k, v in modes.items())],
           reference=references.get(PARTICIPANTS)["content"], by_kind={})


@pytest.mark.parametrize("case", ["rename-fails", "file-in-place-of-folder"])
def test_failed_metrics_write_leaves_no_temp_file(case: str, program_factory, references, record) -> None:
    rel = program_factory(f"known-metrics-{case}", participants=PARTICIPANTS)
    outputs: dict[str, str] = {}
    env: dict[str, str] = {}
    metrics_dir = rel.root / "metrics"
    if case == "rename-fails":
        metrics_dir.mkdir()
        env["PEERSYNC_RELIABILITY_FAIL_RENAMES_INTO"] = str(metrics_dir)
        rel.write_config(output={"metrics_file": str(metrics_dir / "peersync.prom")})
    else:
        metrics_dir.write_text("not a folder\n", encoding="utf-8")
        rel.write_config(output={"metrics_file": str(metrics_dir / "peersync.prom")})
    code, _ = sync(rel, outputs, "sync", env)
    leftovers = [p.name for p in rel.root.rglob("*.tmp")]
    assert not leftovers, leftovers
    assert code in DONE_CODES or code == 78, outputs["sync (stderr)"][-1500:]
    codes = [code]
    if code not in DONE_CODES:
        rel.write_config(output={"metrics_file": "state/metrics.prom"})
        drain(rel, outputs, codes)
    finish(record, rel, f"known-metrics-write-fails-{case}",
           f"A metrics write that fails ({case.replace('-', ' ')}) leaves no temp file", outputs, codes,
           [f"exit {code}; temp files left: 0"], reference=references.get(PARTICIPANTS)["content"],
           by_kind={case: 1})


def test_huge_retry_after_is_not_waited_for(hapi_url, program_factory, references, record) -> None:
    posts = {"n": 0}

    def answer(method: str, path: str, body: bytes) -> Answer | None:
        # the program's own resources land; every participant's transaction after them is asked to wait 100000 s
        if method == "POST":
            posts["n"] += 1
        if method == "POST" and posts["n"] > 1:
            return 503, outcome(503, "transient"), {"Retry-After": "100000"}
        return None

    rel = program_factory("known-retry-after", participants=PARTICIPANTS)
    with ScriptedProxy(hapi_url, answer) as proxy:
        rel.write_config(server_url=proxy.base_url, sync={"retry_after_cap_seconds": 120, "retry_attempts": 5})
        outputs: dict[str, str] = {}
        code, summary = sync(rel, outputs, "sync")
        bodies = list(proxy.bodies)
    assert code == 69 and summary.get("counts", {}).get("pending", 0) > 0, (code, summary.get("counts"))
    repeated = len(bodies) - len(set(bodies))
    assert bodies and repeated == 0, f"{repeated} request(s) retried after a Retry-After of 100000 s"
    # Not waited for, not even up to the cap. (The retry count is no measure: urllib3 may retry a request once on a
    # keep-alive connection the proxy closed after a scripted answer, before the proxy read its body; CI saw 1.)
    assert summary["duration_s"] < 120, summary["duration_s"]
    codes = [code]
    rel.write_config(server_url=hapi_url)
    drain(rel, outputs, codes)
    finish(record, rel, "known-huge-retry-after", "A `Retry-After: 100000` answer is not waited for", outputs, codes,
           [f"{len(bodies)} transaction(s) answered 503 Retry-After 100000, none sent again in that run "
            f"(summary retries {summary['retries']}); "
            f"{summary['counts']['pending']} record(s) pending, exit 69",
            *(f"pending reason: {r} ({n})" for r, n in list((summary.get('pending_reasons') or {}).items())[:1])],
           reference=references.get(PARTICIPANTS)["content"], faults=len(bodies), by_kind={"503 Retry-After": 1})


def test_mrn_changed_to_unknown_says_what_stays_on_the_old_patient(program_factory, references, record) -> None:
    rel = program_factory("known-mrn-changed", participants=PARTICIPANTS)
    outputs: dict[str, str] = {}
    code, _ = sync(rel, outputs, "first sync")
    codes = [code]
    enrollments = rows_of(rel, "enrollments.csv")
    chosen = next(e for e in enrollments if e["enrollment_id"] not in rel.review and e["mrn"])
    original = chosen["mrn"]
    chosen["mrn"] = "ZZ" + original[::-1]
    rewrite(rel, "enrollments.csv", enrollments)
    code, _ = sync(rel, outputs, "sync after MRN change")
    codes.append(code)
    assert code == 65
    listing = run_cli("review", "list", "--json", "--config", str(rel.config))
    outputs["review list (stdout)"] = listing.stdout
    entry = next(e for e in json.loads(listing.stdout) if e["subject"] == f"participant:{chosen['enrollment_id']}")
    assert "earlier records remain active on the previously matched Patient" in entry["detail"], entry
    assert original not in listing.stdout and chosen["mrn"] not in listing.stdout
    chosen["mrn"] = original
    rewrite(rel, "enrollments.csv", enrollments)
    drain(rel, outputs, codes)
    finish(record, rel, "known-mrn-changed-to-unknown",
           "An MRN changed to an unknown one: the review entry says the earlier records stay on the old Patient",
           outputs, codes, [f"review entry: {entry['reason']}: {entry['detail'][:200]}"],
           reference=references.get(PARTICIPANTS)["content"], by_kind={"MRN edited": 1})
