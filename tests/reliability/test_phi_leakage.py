"""PHI leakage: run the demo program through faults (including a server that echoes request values — MRN searches,
notes, names — in its error diagnostics), at every log level and format, and scan everything peersync wrote or
printed for every name, MRN, birth date, note and identifier value of the fixtures. Any hit fails.

Record ids (E0001, C000001...) are allowed only where the design keys on them: the ledger and the review queue.
Rejects reports may show non-identifier cell values (a bad date, an unknown code); identifiers and free text are
masked there by design (connector.read.convert.show_value).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from filelock import FileLock
from integration.syncutil import server_resources

from . import phi
from .faultproxy import Schedule
from .relutil import assert_no_traceback, cli_env, run_cli, seed_for

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

PARTICIPANTS = 12
# Output that keys on record ids by design: the review queue lists subjects (participant:E0013, contact:C000045),
# the dry-run plan counts per participant (E0001: 21 unchanged).
# `peersync pull`'s referrals report and `status` after a pull list each community referral by the program's
# referral id (R0001), by design (docs/care-coordination.md).
RECORD_IDS_ALLOWED = ("review list", "ledger", "plan", "status after pull", "state/pull/")


def ledger_text(path: Path) -> str:
    """Every text value of every table of the ledger."""
    out: list[str] = []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            for row in db.execute(f'SELECT * FROM "{table}"'):
                out.extend(str(v) for v in row if isinstance(v, (str, bytes)))
    return "\n".join(out)


def test_no_phi_in_logs_reports_outputs_ledger_or_metrics(faultproxy, program_factory, record) -> None:
    seed = seed_for("phi")
    schedule = Schedule(seed=seed, rate=0.3, weights={"400-echo": 3.0, "503": 1.0, "429": 1.0, "reset-before": 1.0,
                                                      "drop-after-commit": 1.0, "truncate-after-commit": 1.0,
                                                      "500-after-commit": 1.0})
    proxy = faultproxy(schedule)
    rel = program_factory("phi", server_url=proxy.base_url, participants=PARTICIPANTS,
                          sync={"retry_attempts": 1}, output={"metrics_file": "state/metrics.prom"})
    config = str(rel.config)
    outputs: dict[str, str] = {}

    def run(label: str, *args: str, codes: tuple[int, ...] = (0, 65, 69)) -> None:
        proc = run_cli(*args, env=cli_env({"PEERSYNC_LOG_FORMAT": ""}))
        assert_no_traceback(proc)
        assert proc.returncode in codes, f"{label}: exit {proc.returncode}: {proc.stderr[-1500:]}"
        outputs[f"{label} (stdout)"] = proc.stdout
        outputs[f"{label} (stderr)"] = proc.stderr

    run("sync -v", "sync", "--config", config, "-v")
    run("sync -v --log-format json", "sync", "--config", config, "-v", "--log-format", "json")
    run("sync --json", "sync", "--config", config, "--json")
    faults, echoed, by_kind = proxy.stats.total_faults, proxy.stats.faults["400-echo"], dict(proxy.stats.faults)
    echoed_phi = [h for text in proxy.stats.echoed for h in phi.scan("server diagnostics", text, phi.PHI)]
    proxy.reset()  # no faults: the backlog drains
    run("sync --log-format json", "sync", "--config", config, "--log-format", "json", "--json")
    run("sync -q", "sync", "--config", config, "-q")
    with FileLock(str(rel.ledger) + ".lock", timeout=10):
        run("sync while locked", "sync", "--config", config, "-v", codes=(75,))
    run("status", "status", "--config", config)
    run("status --json", "status", "--config", config, "--json")
    run("review list", "review", "list", "--config", config, "--all")
    run("review list --json", "review", "list", "--config", config, "--all", "--json")
    run("plan --json", "plan", "--config", config, "--json")
    run("landed --json", "landed", "--config", config, "--json")
    run("pull -v", "pull", "--config", config, "-v", codes=(0, 65))
    run("pull --json", "pull", "--config", config, "--json", "--log-format", "json", codes=(0, 65))
    run("status after pull", "status", "--config", config)
    run("status after pull --json", "status", "--config", config, "--json")
    run("check -v", "check", "--profile", "peersync-template", str(rel.program.inputs), "-v",
        "--rejects-dir", str(rel.root / "check-rejects"))

    artifacts: dict[str, str] = dict(outputs)
    for path in sorted((rel.root / "state").rglob("*")) + sorted((rel.root / "check-rejects").glob("*")):
        if path.is_file() and path.suffix in (".csv", ".json", ".prom", ".log", ".txt"):
            artifacts[str(path.relative_to(rel.root))] = path.read_text(encoding="utf-8", errors="replace")
    hits: list[phi.Hit] = []
    for where, text in artifacts.items():
        categories = phi.ALL if not where.startswith(RECORD_IDS_ALLOWED) else phi.PHI
        hits += phi.scan(where, text, categories)
    hits += phi.scan("ledger (text columns)", ledger_text(rel.ledger), phi.PHI)
    for suffix in ("", "-wal"):
        path = Path(str(rel.ledger) + suffix)
        if path.exists():
            hits += phi.scan_bytes(f"ledger file{suffix} (raw bytes)", path.read_bytes(), phi.PHI)
    assert (rel.root / "state" / "metrics.prom").exists(), "the metrics file was not written"
    assert (rel.root / "state" / "metrics-pull.prom").exists(), "the pull's metrics file was not written"
    assert any(k.endswith("referrals.csv") for k in artifacts), "no referrals report was scanned"
    assert any("rejects.csv" in k for k in artifacts), "no rejects report was scanned"
    scanned = sum(len(t) for t in artifacts.values())
    record("phi-leakage", "PHI in logs (text, JSON, -v, -q), reports, command output, ledger, metrics",
           runs=8, faults_injected=faults, faults_by_kind=by_kind, records_sent=len(server_resources(rel.program)),
           duplicates=0, lost=0, phi_hits=len(hits), seed=seed,
           notes=[f"{len(artifacts) + 2} artifacts scanned ({scanned:,} characters plus the ledger's bytes) for "
                  f"{sum(len(v) for v in phi.tokens().values())} sensitive values from the fixtures",
                  f"{echoed} server errors echoed request values in their diagnostics ({len(echoed_phi)} PHI "
                  "values among them: MRN searches, notes, names), all scrubbed by peersync",
                  "record ids allowed only in the ledger, the review queue and the per-participant plan"])
    assert echoed > 0 and echoed_phi, "no server error echoed PHI: the scenario proved nothing"
    # the scanner itself finds what it looks for (a positive control on the fixtures)
    assert phi.scan("control", (phi.DEMO / "template" / "contacts.csv").read_text(encoding="utf-8"), ("note",))
    assert phi.scan("control", "GET /Patient?identifier=urn:oid:1|MRN1680963 for Terrence", ("mrn", "name"))
    assert not hits, f"{len(hits)} PHI hits:\n" + "\n".join(str(h) for h in hits[:25])
