"""What an operator finds on disk and on screen: private file modes (issue 14 item 10), atomic metrics, the
ledger permission errors (item 9), and the CLI friction of issue 20 (status, plan, check, the run's log line)."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import tempfile
from collections import Counter
from pathlib import Path

import click
import pytest
import requests
import responses
from click.testing import CliRunner
from cliutil import DEMO, run, write_config

import connector.ops.metrics
from connector.cli import main
from connector.errors import ExitCode, LedgerError, ServerUnavailableError
from connector.files import write_atomically
from connector.ops.metrics import write_textfile
from connector.ops.status import lock_is_held, status_report
from connector.plan.ledger import Ledger, check_ledger_access
from connector.read.program import write_rejects
from connector.read.staging import Staging
from connector.run import exit_for, outcome_of_error

pytestmark = pytest.mark.usefixtures("peersync_env")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def config(tmp_path: Path, extra: str = "") -> Path:
    return write_config(tmp_path, extra=extra)


# -- file modes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("wanted", "folder"), [(0o600, 0o700), (0o640, 0o750)])
def test_the_ledger_and_its_wal_and_shm_files_are_private(tmp_path: Path, wanted: int, folder: int) -> None:
    old = os.umask(0o022)  # the usual umask, which would leave new files world-readable
    try:
        with Ledger(tmp_path / "state" / "ledger.sqlite", mode=wanted) as ledger:
            ledger.start_run("r1", "sync")
            files = sorted((tmp_path / "state").iterdir())
            modes = {p.name: mode(p) for p in files}
    finally:
        os.umask(old)
    assert modes == {"ledger.sqlite": wanted, "ledger.sqlite-shm": wanted, "ledger.sqlite-wal": wanted}
    assert mode(tmp_path / "state") == folder


def test_the_rejects_report_and_its_folder_are_private(tmp_path: Path) -> None:
    with Staging(tmp_path / "staging.sqlite") as staging:
        csv_path, json_path, _count = write_rejects(staging, tmp_path / "reports" / "rejects")
    assert mode(csv_path) == mode(json_path) == 0o600
    assert mode(tmp_path / "reports" / "rejects") == mode(tmp_path / "reports") == 0o700


def test_the_metrics_file_is_private_or_group_readable(tmp_path: Path) -> None:
    write_textfile(tmp_path / "m" / "peersync.prom", {"exit_code": 0})
    write_textfile(tmp_path / "g" / "peersync.prom", {"exit_code": 0}, mode=0o640)
    assert mode(tmp_path / "m" / "peersync.prom") == 0o600 and mode(tmp_path / "g" / "peersync.prom") == 0o640


def test_group_readable_reaches_the_files_a_sync_creates(tmp_path: Path) -> None:
    from connector.ops.config import load_settings
    from connector.wiring import sync_options

    settings = load_settings(config(tmp_path, "[output]\ngroup_readable = true"))
    assert sync_options(settings).file_mode == 0o640
    assert load_settings(config(tmp_path)).file_mode() == 0o600


def test_a_failed_metrics_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "peersync.prom"
    target.write_text("# the previous run's metrics\n", encoding="utf-8")

    def disk_full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(connector.ops.metrics, "render", lambda *a, **k: "x" * 10)
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError):
        write_textfile(target, {"exit_code": 78})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peersync.prom"]
    assert target.read_text(encoding="utf-8") == "# the previous run's metrics\n"  # untouched


def test_write_atomically_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    write_atomically(target, "one\n")
    write_atomically(target, "two\n")
    assert target.read_text(encoding="utf-8") == "two\n" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# -- a ledger this user cannot write: 78 with the permission fix ---------------------------------------------------


def test_a_read_only_ledger_folder_is_a_ledger_error_naming_the_fix(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    with Ledger(state / "ledger.sqlite"):
        pass
    real_access = os.access
    # Run as root, every folder is writable: simulate the permission bits a service user would meet.
    monkeypatch.setattr(os, "access", lambda p, m, **kw: Path(p) != state and real_access(p, m, **kw))
    with pytest.raises(LedgerError) as caught:
        check_ledger_access(state / "ledger.sqlite")
    message = str(caught.value)
    assert caught.value.exit_code == ExitCode.CONFIG_ERROR and f"the folder {state} is not writable" in message
    assert "write access" in message and "Do not move the ledger aside" in message and "mv " not in message


def test_sync_with_an_unwritable_ledger_folder_exits_78_not_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **kw: Path(p) != state and real_access(p, m, **kw))
    result = run("sync", "--config", str(cfg))
    assert result.exit_code == ExitCode.CONFIG_ERROR, result.output
    assert "is not writable by this user" in result.stderr and "a bug" not in result.stderr


# -- status --------------------------------------------------------------------------------------------------------


def test_lock_is_held_reads_the_kernel_lock_table(tmp_path: Path) -> None:
    lock = tmp_path / "ledger.sqlite.lock"
    assert lock_is_held(lock) is False  # no lock file: no sync has started
    lock.write_text("", encoding="utf-8")
    info = lock.stat()
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    table = tmp_path / "locks"
    table.write_text(f"1: FLOCK  ADVISORY  WRITE 4242 {device} 0 EOF\n", encoding="ascii")
    assert lock_is_held(lock, table) is True
    table.write_text("1: FLOCK  ADVISORY  WRITE 4242 00:01:1 0 EOF\n", encoding="ascii")
    assert lock_is_held(lock, table) is False
    assert lock_is_held(lock, tmp_path / "no-such-table") is None


def test_lock_is_held_sees_a_real_filelock(tmp_path: Path) -> None:
    from filelock import FileLock

    lock = FileLock(str(tmp_path / "ledger.sqlite.lock"), timeout=0)
    with lock:
        assert lock_is_held(tmp_path / "ledger.sqlite.lock") is True
    assert lock_is_held(tmp_path / "ledger.sqlite.lock") is False


def test_status_shows_a_running_run_as_running_and_an_old_one_as_interrupted(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path)
    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        ledger.start_run("run-crashed", "sync")
        ledger.start_run("run-now", "sync")
    monkeypatch.setattr("connector.ops.status.lock_is_held", lambda _path: True)
    report = status_report(tmp_path / "state" / "ledger.sqlite")
    assert [(r["run_id"], r["outcome"]) for r in report["runs"]][:1] == [("run-now", "running")]
    assert {r["run_id"]: r["outcome"] for r in report["runs"]}["run-crashed"] == "interrupted"
    text = run("status", "--config", str(cfg))
    assert text.exit_code == 0 and "None" not in text.stdout and "running" in text.stdout
    monkeypatch.setattr("connector.ops.status.lock_is_held", lambda _path: False)
    assert status_report(tmp_path / "state" / "ledger.sqlite")["last_run"]["outcome"] == "interrupted"


def test_status_into_a_closed_pipe_ends_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path)
    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        for number in range(3):
            ledger.start_run(f"run-{number}", "sync")
            ledger.finish_run(f"run-{number}", "ok", 0, {})
    echoed: list[str] = []

    def head_1(message: object = None, **_kwargs: object) -> None:  # `| head -1`: the reader leaves after a line
        if echoed:
            raise BrokenPipeError(32, "Broken pipe")
        echoed.append(str(message))

    monkeypatch.setattr(click, "echo", head_1)
    result = CliRunner().invoke(main, ["status", "--config", str(cfg)], prog_name="peersync")
    assert result.exit_code == 1 and echoed  # click's own ending for a closed stdout, not our "a bug" message
    assert "unexpected" not in result.output and "a bug" not in result.output


# -- plan, check, the run's outcome and log line ------------------------------------------------------------------


def test_plan_prints_a_table_never_a_python_dict(tmp_path: Path) -> None:
    result = run("plan", "--config", str(config(tmp_path)))
    assert result.exit_code == ExitCode.RECORDS_REJECTED  # the demo has rows the sync would reject
    assert "{" not in result.stdout and "'" not in result.stdout
    assert any(line.startswith("units (records)") for line in result.stdout.splitlines())


def test_check_leaves_no_rejects_folder_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    text = run("check", "--profile", "peersync-template", str(DEMO))
    as_json = run("check", "--profile", "peersync-template", str(DEMO), "--json")
    assert text.exit_code == as_json.exit_code == ExitCode.RECORDS_REJECTED
    assert list(scratch.iterdir()) == []
    assert "rerun with --rejects-dir DIR" in text.stdout and "row " in text.stdout  # the first rejects are shown
    report = json.loads(as_json.stdout)["rejects_report"]
    assert report["csv"] is None and report["problems"] > 0


def test_map_leaves_nothing_in_the_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = run("map", "--profile", "peersync-template", str(DEMO), "--out", str(tmp_path / "out"), "-q")
    assert result.exit_code == ExitCode.RECORDS_REJECTED and list(scratch.iterdir()) == []


def test_outcomes_match_the_docs() -> None:
    assert exit_for(Counter(pending=1)) == (69, "incomplete")
    assert exit_for(Counter(rejected=1)) == (65, "partial")
    assert exit_for(Counter(created=3)) == (0, "ok")
    assert outcome_of_error(69) == "incomplete"
    assert [outcome_of_error(code) for code in (75, 77, 78, 1)] == ["failed"] * 4


@responses.activate
def test_run_finished_carries_the_exit_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from connector.map import MappingContext
    from connector.read.profile import load_profile
    from connector.run import Syncer, SyncOptions
    from connector.server.client import FhirClient, RetryPolicy

    responses.get(re.compile(r"https://ehr\.test/.*"), body=requests.exceptions.ConnectionError("down"))
    profile = load_profile("peersync-template")
    opts = SyncOptions(profile=profile, inputs=[], ledger_path=tmp_path / "ledger.sqlite",
                       ctx=MappingContext.from_profile(profile), rejects_dir=tmp_path / "rejects")
    syncer = Syncer(opts, FhirClient("https://ehr.test/fhir", retry=RetryPolicy(attempts=0)))
    with caplog.at_level(logging.INFO, logger="connector.run"), pytest.raises(ServerUnavailableError):
        syncer.run("run-1")
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "run-finished"]
    assert record.exit_code == 69  # type: ignore[attr-defined]
    assert record.getMessage() == "run finished: incomplete (exit 69)"
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        (recorded,) = ledger.runs()
    assert (recorded["outcome"], recorded["exit_code"]) == ("incomplete", 69)
