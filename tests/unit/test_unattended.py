"""Safe to leave unattended (issue 20): an empty drop folder is not a quiet success, a run that stops with 78
or a bug still writes its metrics, and a switch lets single-record data problems exit 0 for the scheduler."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import responses
from click.testing import CliRunner
from cliutil import write_config

from connector.cli import main
from connector.ops.metrics import parse_samples
from connector.run import attention_reasons, exit_for
from tests.unit.fhir_answers import BASE, answer_transactions, capability_statement, searchset

pytestmark = pytest.mark.usefixtures("peersync_env")


def _config(tmp_path: Path, inputs: Path, extra: str = "") -> Path:
    return write_config(tmp_path, inputs=inputs, base_url=BASE, sync=f"retry_attempts = 0\n{extra}",
                        extra='[output]\nmetrics_file = "metrics/peersync.prom"')


def _metrics(tmp_path: Path) -> dict[str, float]:
    return parse_samples((tmp_path / "metrics" / "peersync.prom").read_text(encoding="utf-8"))


def _sync(config: Path, *args: str) -> tuple[int, str]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, f"{BASE}/metadata", json=capability_statement())
        rsps.add_callback(responses.POST, re.compile(re.escape(BASE) + "/?$"), callback=answer_transactions())
        # No Patient matches: every participant goes to review (a data problem for the program staff).
        rsps.add(responses.GET, re.compile(re.escape(BASE) + "/Patient.*"), json=searchset([]))
        result = CliRunner().invoke(main, ["sync", "--config", str(config), *args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.parametrize(("counts", "kwargs", "expected"), [
    (Counter(created=3), {}, (0, "ok")),
    (Counter(created=3), {"rows_read": 0}, (65, "partial")),  # the drop folder was empty
    (Counter(created=3), {"deletions_held": 40}, (65, "partial")),  # a truncated export
    (Counter(rejected=2), {}, (65, "partial")),
    (Counter(rejected=2, in_review=1, quarantined=1), {"data_problems_exit_zero": True}, (0, "partial")),
    # the switch forgives single records only: an empty input or a guard's hold still needs IT
    (Counter(rejected=2), {"data_problems_exit_zero": True, "rows_read": 0}, (65, "partial")),
    (Counter(), {"data_problems_exit_zero": True, "deletions_held": 1}, (65, "partial")),
    (Counter(), {"data_problems_exit_zero": True, "shape_held": True}, (65, "partial")),
    (Counter(pending=1, rejected=1), {"data_problems_exit_zero": True}, (69, "incomplete")),
    # a clinic referral's Task left in an older status: the referring clinician would see it stale
    (Counter(created=3, clinic_referrals_unanswered=1), {}, (65, "partial")),
    (Counter(clinic_referrals_unanswered=1), {"data_problems_exit_zero": True}, (65, "partial")),
])
def test_exit_for(counts: Counter[str], kwargs: dict[str, object], expected: tuple[int, str]) -> None:
    assert exit_for(counts, **kwargs) == expected  # type: ignore[arg-type]


def test_attention_reasons_in_a_stable_order() -> None:
    assert attention_reasons(Counter(in_review=1, rejected=1), rows_read=0, deletions_held=3) == [
        "no-input-rows", "deletions-held", "records-rejected", "records-in-review"]
    assert attention_reasons(Counter(created=1), rows_read=10) == []


def test_an_empty_drop_folder_says_so_on_stderr_in_the_metrics_and_exit_65(tmp_path: Path) -> None:
    empty = tmp_path / "drop"
    empty.mkdir()
    code, output = _sync(_config(tmp_path, empty), "--json")
    assert code == 65
    assert "no input rows were read" in output and "Check the drop folder" in output
    metrics = _metrics(tmp_path)
    assert metrics['peersync_last_run_rows{result="read"}'] == 0
    assert metrics['peersync_last_run_attention{reason="no-input-rows"}'] == 1
    assert metrics["peersync_last_run_exit_code"] == 65


def test_data_problems_exit_zero_keeps_them_in_the_metrics(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    demo = Path(__file__).resolve().parents[2] / "fixtures" / "demo" / "template"
    for source in demo.glob("*.csv"):
        (inputs / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    goals = inputs / "goals.csv"
    lines = goals.read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    bad = lines[1].split(",")
    bad[header.index("goal_id")] = ""  # a goal row without its id: rejected
    goals.write_text("\n".join([lines[0], ",".join(bad), *lines[2:]]) + "\n", encoding="utf-8")

    config = _config(tmp_path, inputs)
    code, _ = _sync(config, "--exit-zero-on-data-problems")
    assert code == 0
    metrics = _metrics(tmp_path)
    assert metrics['peersync_last_run_records{outcome="rejected"}'] >= 1
    assert metrics['peersync_last_run_attention{reason="records-rejected"}'] == 1
    assert metrics['peersync_last_run_attention{reason="records-in-review"}'] == 1
    assert metrics["peersync_last_run_exit_code"] == 0

    config = _config(tmp_path, inputs, extra="data_problems_exit_zero = true")  # the config switch, same meaning
    assert _sync(config)[0] == 0
    assert _sync(_config(tmp_path, inputs))[0] == 65  # without it: 65, as before


def test_a_config_that_does_not_load_still_writes_exit_78_to_the_metrics(tmp_path: Path) -> None:
    config = _config(tmp_path, tmp_path, extra="no_such_setting = 1")
    code, _ = _sync(config)
    assert code == 78
    metrics = _metrics(tmp_path)
    assert metrics["peersync_last_run_exit_code"] == 78
    assert metrics["peersync_last_success_timestamp_seconds"] == 0  # seeded: "no success" alerts can fire


def test_a_bug_still_writes_exit_1_to_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("connector.run.Syncer.run", broken)
    code, _ = _sync(_config(tmp_path, tmp_path))
    assert code == 1
    assert _metrics(tmp_path)["peersync_last_run_exit_code"] == 1


def test_review_lists_and_retries_quarantined_records_without_source_ids(tmp_path: Path) -> None:
    from connector.plan.ledger import Ledger, UnitState

    config = _config(tmp_path, tmp_path)
    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        for number in (1, 2):
            ledger.record_state(f"goal:G000{number}", kind="goal", participant="E0001", state=UnitState.QUARANTINED,
                                detail="HTTP 404: not-found HAPI-1094", run_id="r1")
    runner = CliRunner()
    listed = runner.invoke(main, ["review", "list", "--quarantined", "--config", str(config)])
    assert listed.exit_code == 0 and "HAPI-1094" in listed.output and "2 quarantined" in listed.output
    assert "G0001" not in listed.output and "rk-" in listed.output  # opaque keys only
    assert runner.invoke(main, ["review", "retry", "--config", str(config)]).exit_code == 2  # which ones?
    retried = runner.invoke(main, ["review", "retry", "--all-quarantined", "--config", str(config)])
    assert retried.exit_code == 0 and "2 quarantined record(s)" in retried.output
    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        assert ledger.quarantined() == [] and ledger.state_counts() == {"pending": 2}
    assert "no quarantined records" in runner.invoke(
        main, ["review", "list", "--quarantined", "--config", str(config)]).output
