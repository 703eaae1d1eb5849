"""CLI commands around a run and the ledger: sync (with a stand-in Syncer: summary, exit codes, metrics,
progress), status, review, plan and landed. The real sync against a server is in tests/integration."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import responses
from click.testing import CliRunner, Result

import connector.run
from connector.cli import main
from connector.errors import ExitCode, LockHeldError, ServerUnavailableError
from connector.ops.metrics import parse_samples
from connector.plan.ledger import Ledger
from connector.run import RunSummary

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "fixtures" / "demo" / "template"
BASE = "https://ehr.example.org/fhir"


pytestmark = pytest.mark.usefixtures("peersync_env")


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False, prog_name="peersync")


@pytest.fixture()
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "peersync.toml"
    path.write_text(f"""
[source]
profile = "peersync-template"
inputs = ["{DEMO}"]
[server]
base_url = "http://127.0.0.1:9/fhir"
[sync]
ledger = "state/ledger.sqlite"
[output]
metrics_file = "metrics/peersync.prom"
""", encoding="utf-8")
    return path


class FakeSyncer:
    """Stands in for connector.run.Syncer: records the summary the way the real one does."""

    behaviour = "ok"

    def __init__(self, opts: Any, client: Any, *, on_progress: Any = None) -> None:
        self.opts, self.on_progress = opts, on_progress
        self.summary: RunSummary | None = None

    def run(self, run_id: str) -> RunSummary:
        summary = RunSummary(run_id=run_id, command="sync", started_at="2026-11-26T12:00:00+00:00")
        self.summary = summary
        if self.behaviour == "lock":
            raise LockHeldError("another peersync run holds the lock")  # before anything is recorded
        with Ledger(self.opts.ledger_path) as ledger:
            ledger.start_run(run_id, "sync")
            if self.on_progress:
                self.on_progress(0, 2)
                self.on_progress(2, 2)
            summary.read = {"read": 10, "accepted": 9, "rejected": 1}
            summary.counts = Counter(rejected=1, created=5, in_review=2, retried=1)
            summary.phases = {"read": 0.2, "plan": 0.1, "write": 1.5}
            summary.duration_s, summary.requests, summary.write_requests = 1.9, 7, 3
            if self.behaviour == "down":
                summary.counts["pending"] = 4
                summary.outcome, summary.exit_code, summary.error = "failed", 69, "server stopped answering"
                ledger.finish_run(run_id, summary.outcome, summary.exit_code, summary.as_dict())
                raise ServerUnavailableError("server stopped answering")
            summary.outcome, summary.exit_code = "partial", 65
            ledger.finish_run(run_id, summary.outcome, summary.exit_code, summary.as_dict())
        return summary


@pytest.fixture()
def fake_syncer(monkeypatch: pytest.MonkeyPatch) -> type[FakeSyncer]:
    monkeypatch.setattr(connector.run, "Syncer", FakeSyncer)
    FakeSyncer.behaviour = "ok"
    return FakeSyncer


def metrics(cfg: Path) -> dict[str, float]:
    return parse_samples((cfg.parent / "metrics" / "peersync.prom").read_text(encoding="utf-8"))


def test_sync_json_summary_exit_code_and_metrics(cfg: Path, fake_syncer: type[FakeSyncer]) -> None:
    result = run("sync", "--config", str(cfg), "--json", "--log-format", "json", "--progress")
    assert result.exit_code == ExitCode.RECORDS_REJECTED
    summary = json.loads(result.stdout)  # the progress bar went to stderr: stdout is pure JSON
    assert summary["outcome"] == "partial" and summary["exit_code"] == 65
    for name in ("rejected", "unchanged", "created", "updated", "voided", "in_review", "quarantined", "retried"):
        assert name in summary["counts"]
    assert summary["read"] == {"read": 10, "accepted": 9, "rejected": 1}
    assert summary["durations"] == {"total_s": 1.9, "read_s": 0.2, "plan_s": 0.1, "write_s": 1.5}
    assert summary["retries"] == 0
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            assert json.loads(line)["run_id"] == summary["run_id"]
    values = metrics(cfg)
    assert values["peersync_last_run_exit_code"] == 65 and "peersync_last_success_timestamp_seconds" in values
    assert values['peersync_backlog_records{state="pending"}'] == 0


def test_sync_text_summary(cfg: Path, fake_syncer: type[FakeSyncer]) -> None:
    result = run("sync", "--config", str(cfg))
    assert result.exit_code == 65
    assert "partial (exit 65)" in result.stdout and "phases: read 0.2s, plan 0.1s, write 1.5s" in result.stdout
    assert "read 10 rows: 9 accepted, 1 rejected" in result.stdout
    assert "participants" not in result.stderr  # no progress bar when stderr is not a terminal
    assert "sync started: peersync" in result.stderr


def test_sync_lock_held_reports_a_failed_run(cfg: Path, fake_syncer: type[FakeSyncer]) -> None:
    fake_syncer.behaviour = "lock"
    result = run("sync", "--config", str(cfg), "--json", "--log-format", "json")
    assert result.exit_code == ExitCode.LOCK_HELD
    summary = json.loads(result.stdout)
    assert summary["outcome"] == "failed" and summary["exit_code"] == 75 and "lock" in summary["error"]
    error = json.loads(result.stderr.splitlines()[-1])
    assert error["level"] == "error" and error["exit_code"] == 75 and error["error_type"] == "LockHeldError"
    assert metrics(cfg)["peersync_last_run_exit_code"] == 75


def test_sync_server_down_keeps_the_runs_own_summary(cfg: Path, fake_syncer: type[FakeSyncer]) -> None:
    run("sync", "--config", str(cfg))  # a success first
    fake_syncer.behaviour = "down"
    result = run("sync", "--config", str(cfg), "--json")
    assert result.exit_code == ExitCode.SERVER_UNAVAILABLE
    summary = json.loads(result.stdout)
    assert summary["counts"]["pending"] == 4 and summary["exit_code"] == 69
    assert result.stderr.strip().endswith("error: server stopped answering")
    values = metrics(cfg)
    assert values["peersync_last_run_exit_code"] == 69
    assert values["peersync_last_success_timestamp_seconds"] > 0  # carried over from the first run
    assert values['peersync_runs_total{exit_code="65"}'] == 1 and values['peersync_runs_total{exit_code="69"}'] == 1


def test_sync_json_log_format_gives_one_json_object_per_line(cfg: Path, fake_syncer: type[FakeSyncer]) -> None:
    """A scheduler that sends stdout and stderr to one file (cron's >>sync.log 2>&1) gets only JSON lines."""
    for extra in ([], ["--json"]):
        result = run("sync", "--config", str(cfg), "--log-format", "json", *extra)
        assert result.exit_code == 65
        lines = [json.loads(line) for line in result.output.splitlines()]  # stdout and stderr interleaved
        (summary,) = [line for line in lines if line.get("event") == "run-summary"]
        assert result.stdout.splitlines() == [json.dumps(summary, ensure_ascii=False)]  # one line on stdout
        assert summary["exit_code"] == 65 and summary["outcome"] == "partial" and summary["counts"]["created"] == 5
        assert {line["run_id"] for line in lines} == {summary["run_id"]}


def test_sync_json_log_format_failed_run_is_a_summary_line_too(cfg: Path, fake_syncer: type[FakeSyncer]) -> None:
    fake_syncer.behaviour = "lock"
    result = run("sync", "--config", str(cfg), "--log-format", "json")
    assert result.exit_code == ExitCode.LOCK_HELD
    summary = json.loads(result.stdout)
    assert summary["event"] == "run-summary" and summary["exit_code"] == 75 and summary["outcome"] == "failed"
    assert all(json.loads(line) for line in result.stderr.splitlines())


def test_sync_quiet_logs_nothing_below_warning(cfg: Path, fake_syncer: type[FakeSyncer]) -> None:
    result = run("sync", "--config", str(cfg), "-q")
    assert result.exit_code == 65 and "sync started" not in result.stderr


def test_status_without_a_ledger(cfg: Path) -> None:
    result = run("status", "--config", str(cfg))
    assert result.exit_code == 0 and "no ledger yet" in result.stdout
    assert not (cfg.parent / "state" / "ledger.sqlite").exists()  # status never creates it
    data = json.loads(run("status", "--config", str(cfg), "--json").stdout)
    assert data["ledger_exists"] is False and data["runs"] == [] and data["last_success"] is None


def test_status_shows_last_run_last_success_and_backlog(cfg: Path, fake_syncer: type[FakeSyncer]) -> None:
    run("sync", "--config", str(cfg))
    fake_syncer.behaviour = "down"
    run("sync", "--config", str(cfg))
    with Ledger(cfg.parent / "state" / "ledger.sqlite") as ledger:
        ledger.record_state("contact:C1", kind="contact", participant="E1", state="pending", detail="x", run_id="r")
        ledger.record_state("goal:G1", kind="goal", participant="E1", state="quarantined", detail="x", run_id="r")
        ledger.open_review("participant:E2", "patient-not-found", "no Patient has this MRN", "r")
    data = json.loads(run("status", "--config", str(cfg), "--json", "--runs", "1").stdout)
    assert len(data["runs"]) == 1 and data["last_run"]["exit_code"] == 69
    assert data["last_run"]["counts"]["pending"] == 4 and data["last_run"]["duration_s"] == 1.9
    assert data["last_success"]["exit_code"] == 65
    assert data["backlog"] == {"pending": 1, "quarantined": 1, "in_review": 0, "not_permitted": 0,
                               "open_reviews": 1}
    text = run("status", "--config", str(cfg)).stdout
    assert "last run:" in text and "last success:" in text and " ago, exit 65)" in text
    assert "backlog:      pending 1, quarantined 1, in review 0, parked 0, open reviews 1" in text


def test_review_list_retry_dismiss(cfg: Path) -> None:
    (cfg.parent / "state").mkdir()
    with Ledger(cfg.parent / "state" / "ledger.sqlite") as ledger:
        ledger.open_review("participant:E0032", "patient-not-found", "no Patient has this MRN", "r1")
        ledger.open_review("goal:G7", "duplicate-on-server", "HTTP 412", "r1")
    listed = run("review", "list", "--config", str(cfg))
    assert listed.exit_code == 0 and "patient-not-found" in listed.stdout and "duplicate-on-server" in listed.stdout
    assert run("review", "retry", "--config", str(cfg), "2").stdout.strip() == "review 2: retry"
    assert run("review", "dismiss", "--config", str(cfg), "1").stdout.strip() == "review 1: dismissed"
    entries = json.loads(run("review", "list", "--config", str(cfg), "--json").stdout)
    assert [e["id"] for e in entries] == [2]
    assert len(json.loads(run("review", "list", "--config", str(cfg), "--all", "--json").stdout)) == 2
    missing = run("review", "retry", "--config", str(cfg), "99")
    assert missing.exit_code == ExitCode.USAGE and "no review entry 99" in missing.stderr


def test_plan_text_and_json(cfg: Path) -> None:
    text = run("plan", "--config", str(cfg))
    # the demo has rows the sync rejects: the plan says so, and exits as the sync would
    assert text.exit_code == ExitCode.RECORDS_REJECTED and "resource type" in text.stdout
    assert "participants with changes:" in text.stdout and "rows the sync would reject: 8" in text.stdout
    data = json.loads(run("plan", "--config", str(cfg), "--json").stdout)
    assert data["read"]["rejected"] == 8 and data["totals"]["create"] > 0
    assert data["sync_counts"]["rejected"] == 8 and data["exit_code"] == ExitCode.RECORDS_REJECTED
    assert data["sync_counts"]["voided"] > 0  # the demo's voided rows: sent as entered-in-error, never "created"
    assert "write strategy: auto: chosen from the CapabilityStatement of the server" in text.stdout


def test_plan_shows_the_configured_strategy_or_the_one_the_last_sync_used(cfg: Path) -> None:
    (cfg.parent / "state").mkdir(exist_ok=True)
    with Ledger(cfg.parent / "state" / "ledger.sqlite") as ledger:
        ledger.set_meta("write_strategy", "batch (auto: the server declares batch but not transaction)")
    data = json.loads(run("plan", "--config", str(cfg), "--json").stdout)
    assert data["write_strategy"] == "auto: last sync wrote as batch (auto: the server declares batch but not " \
                                     "transaction)"
    cfg.write_text(cfg.read_text().replace("[server]\n", '[server]\nwrite_strategy = "single"\n'), encoding="utf-8")
    data = json.loads(run("plan", "--config", str(cfg), "--json").stdout)
    assert data["write_strategy"] == "single (server.write_strategy)"


def test_landed(cfg: Path) -> None:
    cfg.write_text(cfg.read_text().replace("http://127.0.0.1:9/fhir", BASE), encoding="utf-8")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, re.compile(re.escape(BASE) + "/.*"), json={"resourceType": "Bundle", "total": 3})
        text = run("landed", "--config", str(cfg))
        as_json = run("landed", "--config", str(cfg), "--json")
    assert text.exit_code == 0 and f"on {BASE}:" in text.stdout
    rows = json.loads(as_json.stdout)
    assert {r["resource_type"] for r in rows} >= {"Goal", "Provenance"} and rows[0]["total"] == 3


def test_a_resolved_participant_closes_its_review_in_the_same_write(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.open_review("participant:E1", "patient-not-found", "no Patient with this MRN", "run-1")
        ledger.open_review("participant:E2", "patient-not-found", "no Patient with this MRN", "run-1")
        ledger.set_participant("E2", patient_id=None, mrn_hash="h2", state="review", detail="still missing")
        ledger.set_participant("E1", patient_id="123", mrn_hash="h1", state="resolved", detail="", close_review=True)
        assert [r["subject"] for r in ledger.reviews()] == ["participant:E2"]
        assert [r["status"] for r in ledger.reviews(include_closed=True) if r["subject"] == "participant:E1"] == \
            ["resolved"]


# -- verify ------------------------------------------------------------------------------------------------------

VERIFY_BASE = "http://127.0.0.1:9/fhir"


def sent_goals(cfg: Path, n: int) -> None:
    with Ledger(cfg.parent / "state" / "ledger.sqlite") as ledger:
        for i in range(n):
            ledger.record_confirmed(f"goal:G{i}", kind="goal", participant="E1", unit_hash="h", voided=False,
                                    patient_id="p", resources=[("Goal", "https://x/sid/goal", f"G{i}", str(i), "1")],
                                    detail="201", run_id="r")


def goals_on_server(rsps: responses.RequestsMock, *versions: str) -> None:
    entries = [{"resource": {"resourceType": "Goal", "id": str(i), "meta": {"versionId": v}}}
               for i, v in enumerate(versions)]
    rsps.add(responses.GET, f"{VERIFY_BASE}/Goal", json={"resourceType": "Bundle", "type": "searchset",
                                                         "entry": entries})


def test_verify_all_identical_exits_0_with_a_table(cfg: Path) -> None:
    sent_goals(cfg, 2)
    with responses.RequestsMock() as rsps:
        goals_on_server(rsps, "1", "1")
        result = run("verify", "--config", str(cfg))
    assert result.exit_code == 0, result.output
    assert re.search(r"Goal\s+2\s+0\s+0", result.output) and "(1 requests)" in result.output


def test_verify_drift_exits_65_and_lists_it_in_json(cfg: Path) -> None:
    sent_goals(cfg, 3)
    with responses.RequestsMock() as rsps:
        goals_on_server(rsps, "1", "2")  # Goal 1 edited, Goal 2 deleted
        result = run("verify", "--config", str(cfg), "--json")
    assert result.exit_code == 65
    report = json.loads(result.stdout)["verify"]
    assert report["totals"] == {"identical": 1, "changed": 1, "missing": 1}
    assert report["drifted_units"] == ["goal:G1", "goal:G2"]
    assert {d["drift"] for d in report["drifted"]} == {"changed", "missing"}


def test_verify_repair_marks_the_drifted_records_then_syncs(cfg: Path, fake_syncer: type[FakeSyncer]) -> None:
    sent_goals(cfg, 3)
    with responses.RequestsMock() as rsps:
        goals_on_server(rsps, "1", "2")
        result = run("verify", "--config", str(cfg), "--json", "--repair")
    out = json.loads(result.stdout)
    assert out["repair"]["marked"] == 2 and out["repair"]["command"] == "sync"
    assert result.exit_code == 65  # the (stand-in) repair sync's own exit code
    with Ledger(cfg.parent / "state" / "ledger.sqlite") as ledger:
        assert {u.unit_key for u in ledger.units_in_state("pending")} == {"goal:G1", "goal:G2"}
        assert ledger.resources_of("goal:G2") == []  # missing: re-sent by identifier
    assert metrics(cfg)["peersync_last_run_exit_code"] == 65


def test_verify_repair_with_nothing_drifted_sends_nothing(cfg: Path, fake_syncer: type[FakeSyncer]) -> None:
    sent_goals(cfg, 1)
    with responses.RequestsMock() as rsps:
        goals_on_server(rsps, "1")
        result = run("verify", "--config", str(cfg), "--repair")
    assert result.exit_code == 0 and "repair: 0 record(s) marked" in result.output


def test_verify_without_a_ledger_is_a_configuration_error(cfg: Path) -> None:
    result = run("verify", "--config", str(cfg))
    assert result.exit_code == 78 and "no ledger at" in result.output
    assert not (cfg.parent / "state" / "ledger.sqlite").exists()  # not created by looking


def test_connections_opening_a_new_ledger_at_once_create_it_once(tmp_path: Path) -> None:
    """A sync and the metrics of a run refused its lock may open a new ledger together (CI saw 'database is
    locked'): the schema and the salt are created once, under the write lock, and all see the same salt."""
    import threading

    for attempt in range(20):
        path = tmp_path / f"ledger-{attempt}.sqlite"
        barrier = threading.Barrier(8)
        salts: list[str | BaseException] = []

        def open_it(path: Path = path, barrier: threading.Barrier = barrier, salts: list = salts) -> None:
            barrier.wait()
            try:
                with Ledger(path) as ledger:  # its own SQLite connection, like another process
                    salts.append(ledger.meta("salt") or "")
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                salts.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(set(map(str, salts))) == 1 and "" not in salts, salts
        with Ledger(path) as ledger:
            assert ledger.db.execute("PRAGMA user_version").fetchone()[0] == 4


def test_a_run_refused_the_lock_does_not_open_the_ledger_for_its_metrics(
        cfg: Path, fake_syncer: type[FakeSyncer], monkeypatch: pytest.MonkeyPatch) -> None:
    run("sync", "--config", str(cfg))  # the ledger exists: the other run created it
    opened: list[object] = []
    real_init = Ledger.__init__
    monkeypatch.setattr(Ledger, "__init__", lambda self, *a, **k: opened.append(a) or real_init(self, *a, **k))
    fake_syncer.behaviour = "lock"
    assert run("sync", "--config", str(cfg)).exit_code == ExitCode.LOCK_HELD
    assert opened == []
    assert metrics(cfg)["peersync_last_run_exit_code"] == 75


def test_status_lists_each_referral_and_the_last_pull(cfg: Path) -> None:
    with Ledger(cfg.parent / "state" / "ledger.sqlite") as ledger:
        ledger.start_run("sync-1", "sync")
        ledger.finish_run("sync-1", "ok", 0, {})
        ledger.start_run("pull-1", "pull")
        ledger.finish_run("pull-1", "partial", 65, {"counts": {"skipped": 1}})
        ledger.record_referral_statuses([("R0002", "41", "3", "completed", "2026-12-01T10:00:00+00:00",
                                          "organization"), ("R0001", "40", "1", "requested", "", "program")])
        ledger.record_skipped_tasks({"77": "Patient/9 has no MRN in the configured system (urn:x)"}, resolved=set(),
                                    run_id="pull-1")
    data = json.loads(run("status", "--config", str(cfg), "--json").stdout)
    assert data["last_run"]["run_id"] == "sync-1" and [r["run_id"] for r in data["runs"]] == ["sync-1"]
    assert (data["last_pull"]["run_id"], data["last_pull"]["exit_code"]) == ("pull-1", 65)
    assert [(r["referral_id"], r["changed_by"]) for r in data["referrals"]["community_referrals"]] == [
        ("R0001", "program"), ("R0002", "organization")]
    text = run("status", "--config", str(cfg)).stdout
    assert re.search(r"R0002\s+completed\s+2026-12-01T10:00:00\+00:00\s+organization", text)
    assert "clinic referral Task/77 waiting: Patient/9 has no MRN" in text
    assert "last pull:    pull-1" in text and "partial (exit 65)" in text
