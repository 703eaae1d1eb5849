"""Scheduled operation: `peersync sync` run again and again as cron would run it (the real CLI, a config file, a
metrics file, `--log-format json`) while the world changes between runs: rows added, a row rejected then fixed,
the drop folder emptied, the server stopped, then restarted empty. At each step: the exit code, the metrics, the
alerts that docs/examples/peersync-alerts.yml fires on them (promtool) and the log lines.

The restart needs a server of its own (HAPI keeps its data in memory, so a restart wipes it): server.sh on a
second port, ``PEERSYNC_FHIR_SECOND_PORT`` (default: the test server's port + 1), started and stopped here.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import fhirserver  # tests/fhirserver.py (tests/ is put on sys.path by tests/conftest.py)
import pytest

from tests.alertrules import assert_alerts

from .scheduled import BAD_DATE, Run, ScheduledProgram, contact_row, new_program

pytestmark = pytest.mark.integration

HOUR = 3600


def _second_port() -> int:
    return int(os.environ.get("PEERSYNC_FHIR_SECOND_PORT") or fhirserver.local_port() + 1)


def _server_sh(command: str, port: int) -> None:
    env = {**os.environ, "PEERSYNC_FHIR_PORT": str(port)}
    result = subprocess.run(["bash", str(fhirserver.SERVER_SH), command], env=env, capture_output=True, text=True,
                            timeout=fhirserver.start_timeout() + 120, check=False)
    assert result.returncode == 0, f"server.sh {command} on port {port}: {result.stdout}{result.stderr}"


@pytest.fixture
def restartable_server() -> Iterator[str]:
    """A local HAPI server on the second port that the test may stop and restart (stopped at the end)."""
    port = _second_port()
    _server_sh("start", port)
    try:
        yield f"http://127.0.0.1:{port}/fhir"
    finally:
        _server_sh("stop", port)


def _checks(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    return {check["name"]: check for check in json.loads(result.stdout)["checks"]}


def _assert_finished(run: Run, exit_code: int, outcome: str) -> None:
    """The summary line, the `run finished` log line and the metrics agree on how the run ended."""
    assert run.exit_code == exit_code, run.summary
    assert run.summary is not None and run.summary["exit_code"] == exit_code and run.summary["outcome"] == outcome
    finished = run.events("run-finished")
    assert len(finished) == 1 and finished[0]["exit_code"] == exit_code and finished[0]["outcome"] == outcome
    assert {line["run_id"] for line in run.logs} == {run.summary["run_id"]}
    assert run.metrics["peersync_last_run_exit_code"] == exit_code


def _no_temp_files(program: ScheduledProgram) -> None:
    assert [p.name for p in program.metrics_file.parent.iterdir()] == ["peersync.prom"]


def test_a_week_of_scheduled_runs(tmp_path: Path, restartable_server: str) -> None:
    program = new_program(tmp_path, restartable_server)
    program.load_patients(2)
    contacts = [contact_row(1, 1), contact_row(2, 2)]
    program.write_inputs(2, contacts)

    # 1. The first run sends everything.
    first = program.sync()
    _assert_finished(first, 0, "ok")
    assert first.summary and first.summary["counts"]["created"] > 0
    assert first.metrics['peersync_last_run_rows{result="read"}'] == 5
    assert_alerts(first.metrics_text, set())
    _no_temp_files(program)

    # 2. Rows added: only the new contact is sent.
    contacts.append(contact_row(3, 1))
    program.write_inputs(2, contacts)
    added = program.sync()
    _assert_finished(added, 0, "ok")
    assert added.metrics['peersync_last_run_records{outcome="created"}'] == 1
    assert added.metrics['peersync_runs_total{exit_code="0"}'] == 2
    assert_alerts(added.metrics_text, set())

    # 3. A row the program got wrong: 65, reported to the program staff, nobody paged.
    program.write_inputs(2, [*contacts, contact_row(4, 2, when=BAD_DATE)])
    rejected = program.sync()
    _assert_finished(rejected, 65, "partial")
    assert rejected.metrics['peersync_last_run_rows{result="rejected"}'] == 1
    assert rejected.metrics['peersync_last_run_attention{reason="records-rejected"}'] == 1
    assert rejected.metrics["peersync_last_success_timestamp_seconds"] > 0  # 65 completed the run
    assert_alerts(rejected.metrics_text, {'PeersyncDataProblems{reason="records-rejected"}'})

    # 4. The row fixed: it is sent, the alert clears.
    contacts.append(contact_row(4, 2))
    program.write_inputs(2, contacts)
    fixed = program.sync()
    _assert_finished(fixed, 0, "ok")
    assert fixed.metrics['peersync_last_run_records{outcome="created"}'] == 1
    assert 'peersync_last_run_attention{reason="records-rejected"}' not in fixed.metrics
    assert_alerts(fixed.metrics_text, set())

    # 5. The export job left the drop folder empty: nothing is deleted, IT gets a ticket.
    program.empty_inputs()
    empty = program.sync()
    _assert_finished(empty, 65, "partial")
    assert empty.metrics['peersync_last_run_rows{result="read"}'] == 0
    assert empty.metrics["peersync_last_run_deletions_held"] > 0
    assert empty.metrics['peersync_last_run_records{outcome="deleted"}'] == 0
    warnings = [line["message"] for line in empty.logs if line["level"] == "warning"]
    assert any("no input rows were read" in message for message in warnings), warnings
    assert_alerts(empty.metrics_text, {"PeersyncNoInputRows", "PeersyncDeletionsHeld"})

    # 6. The export is back with a new row, but the server is down: 69; one such run pages nobody, two hours
    # of them do.
    contacts.append(contact_row(5, 1))
    program.write_inputs(2, contacts)
    _server_sh("stop", _second_port())
    down = program.sync()
    _assert_finished(down, 69, "incomplete")
    # Stopped at the first request (GET /metadata): nothing was written or marked, the next run plans it again.
    assert [line["error_type"] for line in down.events("error")] == ["ServerUnavailableError"]
    assert down.events("plan")[0]["counts"]["create"] >= 1
    assert down.metrics['peersync_last_run_requests{kind="write"}'] == 0
    assert down.metrics["peersync_last_success_timestamp_seconds"] == empty.metrics[
        "peersync_last_success_timestamp_seconds"]
    assert_alerts(down.metrics_text, set())
    assert_alerts(down.metrics_text, {"PeersyncNoRecentSuccess"}, later_s=2 * HOUR + 60)

    # 7. The server comes back EMPTY (a restore, a refreshed test EHR) with the clinic's Patients (new ids).
    _server_sh("start", _second_port())
    program.load_patients(2)
    back = program.sync()
    # The new contact refers to resources the ledger says the server has: the server lost them, so they are
    # marked for re-send and the contact waits (69, pending) ...
    _assert_finished(back, 69, "incomplete")
    assert back.events("lost-reference-target")
    assert list(back.summary["pending_reasons"]) == [  # type: ignore[index]
        "a resource it references was lost by the server: re-sent with its target on the next run"]
    assert_alerts(back.metrics_text, set())
    # ... and the next scheduled run sends them, then it.
    resent = program.sync()
    _assert_finished(resent, 0, "ok")
    assert resent.metrics['peersync_last_run_records{outcome="created"}'] >= 2
    assert_alerts(resent.metrics_text, set())
    # What nothing refers to (the older contacts) is still missing, and a sync cannot see it: doctor does.
    doctor = program.peersync("doctor", "--config", str(program.config), "--json")
    assert doctor.returncode == 65, doctor.stdout + doctor.stderr
    ledger_server = _checks(doctor)["ledger.server"]
    assert ledger_server["status"] == "fail" and "missing on the server" in ledger_server["detail"]
    assert "peersync verify --repair" in ledger_server["fix"]

    # 8. `verify --repair` restores them; doctor, verify and the next scheduled run are clean again.
    repair = program.peersync("verify", "--config", str(program.config), "--repair", "--json", "-q")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    verify = program.peersync("verify", "--config", str(program.config), "--json", "-q")
    assert verify.returncode == 0, verify.stdout
    assert program.peersync("doctor", "--config", str(program.config), "--json").returncode == 0
    after = program.sync()
    _assert_finished(after, 0, "ok")
    assert after.metrics['peersync_last_run_records{outcome="unchanged"}'] > 0
    assert after.metrics['peersync_runs_total{exit_code="65"}'] == 2
    assert after.metrics['peersync_runs_total{exit_code="69"}'] == 2
    assert_alerts(after.metrics_text, set())
    _no_temp_files(program)
