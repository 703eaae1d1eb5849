"""docs/examples/peersync-alerts.yml evaluated (promtool test rules) against the metrics files of real `peersync
sync` runs that end in each documented way: 78, 69, 65 with rejected rows, 65 with an empty drop folder, 0."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.alertrules import assert_alerts

from .scheduled import BAD_DATE, contact_row, new_program

pytestmark = pytest.mark.integration

HOUR = 3600


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_configuration_error_pages_and_never_succeeded(tmp_path: Path, fhir_base_url: str) -> None:
    program = new_program(tmp_path, fhir_base_url)
    program.write_config(extra="no_such_setting = 1")
    program.write_inputs(1, [contact_row(1, 1)])
    run = program.sync()
    assert run.exit_code == 78 and run.summary is None  # no run: the error line says why
    assert [line["error_type"] for line in run.events("error")] == ["ConfigError"]
    assert run.metrics["peersync_last_success_timestamp_seconds"] == 0
    assert_alerts(run.metrics_text, {"PeersyncRunFailed", "PeersyncNoRecentSuccess"})


def test_server_unavailable_alerts_only_when_it_persists(tmp_path: Path, fhir_base_url: str) -> None:
    program = new_program(tmp_path, fhir_base_url)
    program.write_inputs(1, [contact_row(1, 1)])
    program.load_patients(1)
    assert program.sync().exit_code == 0
    program.write_inputs(1, [contact_row(1, 1), contact_row(2, 1)])  # a run with nothing to send asks nothing
    program.write_config(base_url=f"http://127.0.0.1:{_closed_port()}/fhir")
    run = program.sync()
    assert run.exit_code == 69 and run.summary and run.summary["outcome"] == "incomplete"
    assert_alerts(run.metrics_text, set())  # one 69 (a maintenance window) pages nobody
    assert_alerts(run.metrics_text, {"PeersyncNoRecentSuccess"}, later_s=2 * HOUR + 60)


def test_rejected_rows_are_reported_to_the_program_not_paged(tmp_path: Path, fhir_base_url: str) -> None:
    program = new_program(tmp_path, fhir_base_url)
    program.write_inputs(1, [contact_row(1, 1), contact_row(2, 1, when=BAD_DATE)])
    program.load_patients(1)
    run = program.sync()
    assert run.exit_code == 65
    assert run.metrics['peersync_last_run_rows{result="rejected"}'] == 1
    assert_alerts(run.metrics_text, {'PeersyncDataProblems{reason="records-rejected"}'})


def test_an_empty_drop_folder_opens_a_ticket(tmp_path: Path, fhir_base_url: str) -> None:
    program = new_program(tmp_path, fhir_base_url)
    program.inputs.mkdir()
    run = program.sync()
    assert run.exit_code == 65
    assert run.metrics['peersync_last_run_rows{result="read"}'] == 0
    assert_alerts(run.metrics_text, {"PeersyncNoInputRows"})


def test_a_successful_run_is_quiet_until_the_schedule_stops(tmp_path: Path, fhir_base_url: str) -> None:
    program = new_program(tmp_path, fhir_base_url)
    program.write_inputs(2, [contact_row(1, 1), contact_row(2, 2)])
    program.load_patients(2)
    run = program.sync()
    assert run.exit_code == 0, run.summary
    assert_alerts(run.metrics_text, set())
    assert_alerts(run.metrics_text, set(), later_s=2 * HOUR - 60)
    # No run at all for 3 hours: the timer or CronJob stopped.
    assert_alerts(run.metrics_text, {"PeersyncNoRecentSuccess", "PeersyncNotRunning"}, later_s=3 * HOUR + 60)


def test_the_evaluator_fails_when_the_expectation_is_wrong(tmp_path: Path, fhir_base_url: str) -> None:
    program = new_program(tmp_path, fhir_base_url)
    program.write_config(extra="no_such_setting = 1")
    run = program.sync()
    with pytest.raises(AssertionError, match="PeersyncRunFailed"):
        assert_alerts(run.metrics_text, set())
