"""Unit tests for the bugs the reliability suite (tests/reliability) found; each names the scenario that exposed it."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from pathlib import Path

import pytest
import requests
import responses
from responses.registries import OrderedRegistry

from connector.errors import (
    ExitCode,
    LedgerError,
    ServerUnavailableError,
    TransportError,
)
from connector.map import MappingContext
from connector.plan.ledger import Ledger
from connector.plan.planner import PlannedUnit
from connector.read.formats.csv_reader import read_csv
from connector.read.profile import load_profile
from connector.read.staging import Staging
from connector.run import Syncer, SyncOptions
from connector.server.client import FhirClient, RetryPolicy
from connector.write.writer import Writer

BASE = "https://ehr.test/fhir"
FAST = RetryPolicy(attempts=2, backoff_factor=0.0, backoff_max=0.0, jitter=0.0, retry_after_cap=0.0)
OK = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}
BUNDLE = {"resourceType": "Bundle", "type": "transaction", "entry": []}


# -- http-faults (truncate-after-commit): a body cut off mid-read is retried, not a crash ---------------------------


@responses.activate(registry=OrderedRegistry)
def test_response_cut_off_mid_body_is_retried() -> None:
    responses.post(BASE + "/", body=requests.exceptions.ChunkedEncodingError("Connection broken: reset"))
    responses.post(BASE + "/", json=OK)
    client = FhirClient(BASE, retry=FAST)
    assert client.transaction(BUNDLE) == OK
    assert client.stats.retries == 1


@responses.activate(registry=OrderedRegistry)
def test_response_cut_off_every_time_is_server_unavailable() -> None:
    for _ in range(3):
        responses.post(BASE + "/", body=requests.exceptions.ChunkedEncodingError("Connection broken: reset"))
    client = FhirClient(BASE, retry=FAST)
    with pytest.raises(ServerUnavailableError, match="broke off 3 times"):
        client.transaction(BUNDLE)


# -- transport-self-signed: an untrusted certificate is a configuration error, not "unavailable" -----------------------


@responses.activate
def test_untrusted_certificate_is_a_transport_error_naming_the_fix() -> None:
    responses.get(BASE + "/metadata", body=requests.exceptions.SSLError(
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate (_ssl.c:1006)"))
    client = FhirClient(BASE, retry=FAST)
    with pytest.raises(TransportError) as err:
        client.capabilities()
    assert err.value.exit_code == ExitCode.CONFIG_ERROR
    assert "self-signed certificate" in str(err.value) and "ca_bundle" in str(err.value)
    assert len(responses.calls) == 1  # not retried


# -- ledger-corrupt-random-bytes-in-pages: damage inside the file is found when the ledger is opened ------------------


def test_clobbered_pages_are_reported_with_the_recovery_path(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        for i in range(300):  # run history only: the units table (read at open) stays intact
            ledger.start_run(f"run{i}", "sync")
            ledger.finish_run(f"run{i}", "ok", 0, {"counts": {"created": i}, "padding": "p" * 400})
        pages = [n for (n,) in ledger.db.execute("SELECT pageno FROM dbstat WHERE name='runs' AND pagetype='leaf'")]
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[16:18], "big")
    for n in pages[1::2]:
        data[(n - 1) * size:(n - 1) * size + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))
    with sqlite3.connect(path) as db:  # the check the ledger used to rely on still passes
        assert db.execute("SELECT count(*) FROM units").fetchone() == (0,)
    with pytest.raises(LedgerError) as err:
        Ledger(path)
    assert "unreadable or corrupt" in str(err.value) and f"mv {path} {path}.broken" in str(err.value)


# -- ledger-disk-full: SQLite's own rollback must not hide "disk is full" ---------------------------------------------


def test_disk_full_is_reported_as_disk_full(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        pages = ledger.db.execute("PRAGMA page_count").fetchone()[0]
        ledger.db.execute(f"PRAGMA max_page_count = {pages + 1}")
        with pytest.raises(LedgerError, match="the disk is full"):
            for i in range(200):
                ledger.record_state(f"contact:C{i}", kind="contact", participant="E1", state="pending",
                                    detail="x" * 500, run_id="r")
        assert not ledger.db.in_transaction
        ledger.db.execute("PRAGMA max_page_count = 1000000")
        ledger.record_state("contact:after", kind="contact", participant="E1", state="pending", detail="", run_id="r")


# -- hostile-input-corpus (truncated file): a row cut off at the end of a file is rejected -----------------------------


def test_row_cut_off_at_the_end_of_a_csv_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "contacts.csv"
    path.write_bytes(b'contact_id,mode,notes,void\r\nC1,phone,"whole",\r\nC2,phone,"this note was cu')
    rows = list(read_csv(path))
    assert rows[0].error is None and rows[0].values["notes"] == "whole"
    assert rows[1].error is not None and "cut off" in rows[1].error and rows[1].location.row == 3


def test_short_last_row_with_a_final_line_break_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "contacts.csv"
    path.write_bytes(b"contact_id,mode,notes\r\nC1,phone\r\n")  # missing cells are None (not a cut-off file)
    (row,) = list(read_csv(path))
    assert row.error is None and row.values == {"contact_id": "C1", "mode": "phone", "notes": None}


# -- sync: failed runs are recorded as failed; workers never share SQLite connections --------------------------------


def _syncer(tmp_path: Path, client: FhirClient) -> Syncer:
    profile = load_profile("peersync-template")
    opts = SyncOptions(profile=profile, inputs=[], ledger_path=tmp_path / "ledger.sqlite",
                       ctx=MappingContext.from_profile(profile), rejects_dir=tmp_path / "rejects")
    return Syncer(opts, client)


def _writer(tmp_path: Path, client: FhirClient) -> Writer:
    syncer = _syncer(tmp_path, client)
    return Writer(syncer.opts, client, Counter())


def test_an_unexpected_error_is_recorded_as_a_failed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncer = _syncer(tmp_path, FhirClient(BASE, retry=FAST))

    def boom(*_args: object) -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(syncer, "_run", boom)
    with pytest.raises(sqlite3.DatabaseError):
        syncer.run("run1")
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        (run,) = ledger.runs()
    assert (run["outcome"], run["exit_code"]) == ("failed", 1)
    assert run["summary"]["error"] == "unexpected DatabaseError"


def test_marking_pending_after_the_server_went_down_uses_the_worker_s_own_connection(tmp_path: Path) -> None:
    syncer = _writer(tmp_path, FhirClient(BASE, retry=FAST))
    syncer._server_down.set()
    errors: list[BaseException] = []
    with Staging(tmp_path / "staging.sqlite") as staging, Ledger(tmp_path / "ledger.sqlite") as ledger:
        staging.db.execute("CREATE TABLE plan (unit_key TEXT PRIMARY KEY, kind TEXT, source_id TEXT, "
                           "participant TEXT, hash TEXT, action TEXT)")
        staging.db.execute("INSERT INTO plan VALUES ('contact:C1','contact','C1','E1','h1','create')")

        def worker() -> None:
            try:
                syncer._participant_in_run("run1", staging, ledger, "E1")
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(30)
        assert not errors, errors
        unit = ledger.unit("contact:C1")
    assert unit is not None and unit.state == "pending"


# -- phi-leakage (400-echo): a refused Patient search sends the participant to review, scrubbed --------------------


@responses.activate
def test_a_refused_patient_search_goes_to_review_without_phi(tmp_path: Path) -> None:
    responses.get(BASE + "/Patient", status=400, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid",
         "diagnostics": 'HAPI-0524: bad search Patient?identifier=urn:oid:1|MRN1680963 "Terrence Rodriguez"'}]})
    syncer = _writer(tmp_path, FhirClient(BASE, retry=FAST))
    patient_id, reason, detail = syncer._resolve_patient("urn:oid:1", "MRN1680963")
    assert (patient_id, reason) == (None, "patient-search-failed")
    assert "HTTP 400" in detail and "MRN1680963" not in detail and "Terrence" not in detail


# -- issue 14 item 10: an MRN changed to an unknown one says what stays on the old Patient ------------------------


@responses.activate
def test_an_mrn_changed_to_an_unknown_one_says_the_earlier_records_remain_on_the_old_patient(tmp_path: Path) -> None:
    from datetime import date

    from connector.model import Enrollment

    responses.get(BASE + "/Patient", json={"resourceType": "Bundle", "type": "searchset", "entry": []})
    writer = _writer(tmp_path, FhirClient(BASE, retry=FAST))
    enrollment = Enrollment(enrollment_id="E1", mrn="MRN-NEW-4711", start_date=date(2026, 1, 5), supporter_id="S1")
    rows = [PlannedUnit("contact:C1", "contact", "C1", "h2", "update"),
            PlannedUnit("contact:C2", "contact", "C2", "h3", "create")]
    with Staging(tmp_path / "staging.sqlite") as staging, Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.record_confirmed("contact:C1", kind="contact", participant="E1", unit_hash="h1", voided=False,
                                patient_id="P-OLD", resources=[], detail="", run_id="run0")
        writer._write_participant(staging, ledger, enrollment, rows)
        (entry,) = ledger.reviews()
    assert entry["reason"] == "patient-not-found"
    assert "earlier records remain active on the previously matched Patient" in entry["detail"]
    assert "MRN-NEW-4711" not in entry["detail"] and "P-OLD" not in entry["detail"]


@responses.activate
def test_a_participant_never_matched_before_gets_no_note_about_an_old_patient(tmp_path: Path) -> None:
    from datetime import date

    from connector.model import Enrollment

    responses.get(BASE + "/Patient", json={"resourceType": "Bundle", "type": "searchset", "entry": []})
    writer = _writer(tmp_path, FhirClient(BASE, retry=FAST))
    enrollment = Enrollment(enrollment_id="E1", mrn="MRN-4711", start_date=date(2026, 1, 5), supporter_id="S1")
    with Staging(tmp_path / "staging.sqlite") as staging, Ledger(tmp_path / "ledger.sqlite") as ledger:
        writer._write_participant(staging, ledger, enrollment,
                                 [PlannedUnit("contact:C1", "contact", "C1", "h1", "create")])
        (entry,) = ledger.reviews()
    assert entry["detail"] == "no Patient has this participant's MRN"
