"""``peersync pull``'s I/O against a small in-memory FHIR server (``responses``): one bad Task never blocks the
others, skipped Tasks are re-read until delivered, the incremental search's overlap, a real 412 then success,
a malformed answer, a Task of another organization, and the organization's status kept for good."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import responses

from connector.identifiers import KIND_REFERRAL_TASK
from connector.map.context import MappingContext
from connector.plan.ledger import ConfirmedUnit, Ledger
from connector.pull.answers import AnswerReport, DesiredTask, _move
from connector.pull.puller import SINCE_KEY, Puller, PullOptions, fetch_referral_statuses, organization_task_fields
from connector.read.profile import load_profile
from connector.server.client import FhirClient, RetryPolicy

BASE = "http://fhir.test/fhir"
MRN_SYSTEM = "urn:oid:1.2.3"
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
CTX = MappingContext(program_id="p1", program_name="P", base_url="https://example.org", mrn_system=MRN_SYSTEM)


class FakeEhr:
    """Tasks, Patients and ServiceRequests in memory, answering the searches, reads and If-Match PUTs that pull
    makes; ``put_failures`` maps a Task id to the HTTP status its next PUTs answer; every request is kept."""

    def __init__(self) -> None:
        self.resources: dict[tuple[str, str], dict[str, Any]] = {
            ("Organization", "org1"): {"resourceType": "Organization", "id": "org1"}}
        self.put_failures: dict[str, list[int]] = {}
        self.concurrent_edit: set[str] = set()  # Task ids the EHR edits between pull's read and its PUT
        self.gone_on_read: set[str] = set()  # Task ids a read answers 410 Gone for
        self.task_search_body: Any = None  # a malformed answer to the next Task search, when set
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []

    def add(self, resource: dict[str, Any], *, last_updated: datetime = NOW - timedelta(hours=1)) -> None:
        resource.setdefault("meta", {}).update(versionId=resource.get("meta", {}).get("versionId", "1"),
                                               lastUpdated=last_updated.isoformat())
        self.resources[(resource["resourceType"], resource["id"])] = resource

    def referral(self, n: int, *, mrn: str | None = "M", owner: str = "org1",
                 last_updated: datetime = NOW - timedelta(hours=1)) -> str:
        identifiers = [{"system": MRN_SYSTEM, "value": f"{mrn}{n}"}] if mrn else []
        self.add({"resourceType": "Patient", "id": f"p{n}", "identifier": identifiers,
                  "name": [{"given": ["Rosa"], "family": f"Delgado{n}"}]})
        self.add({"resourceType": "ServiceRequest", "id": f"sr{n}", "status": "active",
                  "code": {"coding": [{"system": "http://snomed.info/sct", "code": "103698003"}]}})
        self.add({"resourceType": "Task", "id": f"t{n}", "status": "requested", "intent": "order",
                  "owner": {"reference": f"Organization/{owner}"}, "for": {"reference": f"Patient/p{n}"},
                  "focus": {"reference": f"ServiceRequest/sr{n}"}}, last_updated=last_updated)
        return f"t{n}"

    def install(self, mock: responses.RequestsMock) -> None:
        mock.add_callback(responses.GET, f"{BASE}/Organization", callback=self._organization)
        mock.add_callback(responses.GET, f"{BASE}/Task", callback=self._task_search)
        mock.add_callback(responses.GET, re.compile(rf"{BASE}/Task/[^/?]+$"), callback=self._read)
        mock.add_callback(responses.PUT, re.compile(rf"{BASE}/Task/[^/?]+$"), callback=self._put)

    def _log(self, request: Any) -> dict[str, list[str]]:
        query = parse_qs(urlsplit(request.url).query)
        self.requests.append((request.method, urlsplit(request.url).path, query))
        return query

    @staticmethod
    def _bundle(matches: list[dict[str, Any]], included: list[dict[str, Any]] = ()) -> tuple[int, dict, str]:
        entries = [{"resource": r, "search": {"mode": "match"}} for r in matches]
        entries += [{"resource": r, "search": {"mode": "include"}} for r in included]
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entries})

    def _organization(self, request: Any) -> tuple[int, dict, str]:
        self._log(request)
        return self._bundle([self.resources[("Organization", "org1")]])

    def _task_search(self, request: Any) -> tuple[int, dict, str]:
        query = self._log(request)
        if self.task_search_body is not None:
            body, self.task_search_body = self.task_search_body, None
            return 200, {"Content-Type": "text/html"}, body
        tasks = [r for (kind, _), r in self.resources.items() if kind == "Task"]
        if "_id" in query:
            wanted = set(query["_id"][0].split(","))
            tasks = [t for t in tasks if t["id"] in wanted]
        if "identifier" in query:
            system = query["identifier"][0].rstrip("|")
            tasks = [t for t in tasks if any(i.get("system") == system for i in t.get("identifier", []))]
        if "status" in query:
            tasks = [t for t in tasks if t["status"] in query["status"][0].split(",")]
        if "_lastUpdated" in query:
            since = datetime.fromisoformat(query["_lastUpdated"][0].removeprefix("ge"))
            tasks = [t for t in tasks if datetime.fromisoformat(t["meta"]["lastUpdated"]) >= since]
        # "owner" is deliberately not applied: pull checks the owner of every Task itself
        included = []
        if "_include" in query:
            for task in tasks:
                for element in ("for", "focus"):
                    kind, _, rid = task.get(element, {}).get("reference", "/").partition("/")
                    if (kind, rid) in self.resources:
                        included.append(self.resources[(kind, rid)])
        return self._bundle(tasks, included)

    def _read(self, request: Any) -> tuple[int, dict, str]:
        self._log(request)
        task_id = urlsplit(request.url).path.rsplit("/", 1)[1]
        if task_id in self.gone_on_read:
            return 410, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "deleted"}]})
        task = self.resources.get(("Task", task_id))
        if task is None:
            return 404, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "not-found"}]})
        return 200, {}, json.dumps(task)

    def _put(self, request: Any) -> tuple[int, dict, str]:
        self._log(request)
        task_id = urlsplit(request.url).path.rsplit("/", 1)[1]
        current = self.resources[("Task", task_id)]
        if task_id in self.concurrent_edit:
            self.concurrent_edit.discard(task_id)
            current = self._bump(current, {**current, "note": [{"text": "edited in the EHR"}]})
        if self.put_failures.get(task_id):
            status = self.put_failures[task_id].pop(0)
            return status, {}, json.dumps({"resourceType": "OperationOutcome",
                                           "issue": [{"severity": "error", "code": "processing"}]})
        if request.headers.get("If-Match") != f'W/"{current["meta"]["versionId"]}"':
            return 412, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "conflict"}]})
        stored = self._bump(current, json.loads(request.body))
        return 200, {}, json.dumps(stored)

    def _bump(self, current: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        version = str(int(current["meta"]["versionId"]) + 1)
        stored = {**new, "id": current["id"], "meta": {**new.get("meta", {}), "versionId": version,
                                                       "lastUpdated": NOW.isoformat()}}
        self.resources[("Task", current["id"])] = stored
        return stored


@pytest.fixture()
def ehr() -> Iterator[FakeEhr]:
    fake = FakeEhr()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        fake.install(mock)
        yield fake


@pytest.fixture()
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.sqlite") as opened:
        yield opened


def puller(tmp_path: Path, *, mark_received: bool = True) -> Puller:
    """A Puller whose clock moves a second per call (each pull its own intake file name)."""
    ticks = itertools.count(len(list((tmp_path / "intake").glob("*.csv"))) * 1000)
    opts = PullOptions(ctx=CTX, profile=load_profile("peersync-template"), inputs=[], intake_dir=tmp_path / "intake",
                       reports_dir=tmp_path / "reports", program_organization=("urn:org", "p1"),
                       mark_received=mark_received)
    return Puller(opts, FhirClient(BASE, retry=RetryPolicy(attempts=0)),
                  clock=lambda: NOW + timedelta(seconds=next(ticks)))


def intake_task_ids(tmp_path: Path) -> list[str]:
    import csv

    return [row["clinic_referral"] for path in sorted((tmp_path / "intake").glob("intake-*.csv"))
            for row in csv.DictReader(path.open(encoding="utf-8"))]


# -- one bad Task never blocks the others ---------------------------------------------------------------------

def test_a_task_the_server_refuses_is_reported_and_the_others_still_land(tmp_path: Path, ehr: FakeEhr,
                                                                         ledger: Ledger) -> None:
    for n in (1, 2, 3):
        ehr.referral(n)
    ehr.put_failures["t2"] = [422]
    summary = puller(tmp_path).run(ledger)
    assert summary.received == 2 and summary.delivered == 3
    assert {ehr.resources[("Task", t)]["status"] for t in ("t1", "t3")} == {"received"}
    assert ehr.resources[("Task", "t2")]["status"] == "requested"
    (problem,) = summary.problems
    assert problem.startswith("Task/t2: not moved to received (HTTP 422") and "Delgado" not in problem
    assert summary.exit_code() == 65
    assert summary.referrals_report  # the next step ran

    # The next pull finds t2 again (its lastUpdated did not change: re-read by id) and moves it; no second row.
    summary = puller(tmp_path).run(ledger)
    assert (summary.received, summary.delivered, summary.problems) == (1, 0, [])
    assert ehr.resources[("Task", "t2")]["status"] == "received"
    assert sorted(intake_task_ids(tmp_path)) == ["t1", "t2", "t3"]


def test_a_task_gone_between_search_and_read_is_reported_not_raised(tmp_path: Path, ehr: FakeEhr,
                                                                   ledger: Ledger) -> None:
    ehr.referral(1)
    ehr.referral(2)
    ehr.gone_on_read.add("t1")  # deleted in the EHR after the search answered
    summary = puller(tmp_path).run(ledger)
    assert summary.received == 1 and ehr.resources[("Task", "t2")]["status"] == "received"
    assert [p.split(":")[0] for p in summary.problems] == ["Task/t1"] and "HTTP 410" in summary.problems[0]


# -- a real 412, then success ---------------------------------------------------------------------------------

def test_a_412_is_re_read_and_re_applied_keeping_the_ehrs_edit(tmp_path: Path, ehr: FakeEhr, ledger: Ledger) -> None:
    ehr.referral(1)
    ehr.concurrent_edit.add("t1")
    summary = puller(tmp_path).run(ledger)
    assert (summary.concurrent_edits, summary.received, summary.problems) == (1, 1, [])
    stored = ehr.resources[("Task", "t1")]
    assert stored["status"] == "received" and stored["note"] == [{"text": "edited in the EHR"}]
    puts = [q for m, p, q in ehr.requests if m == "PUT"]
    assert len(puts) == 2  # refused once (412), then applied on the re-read version


def test_answers_move_re_reads_after_a_412_and_completes(ehr: FakeEhr) -> None:
    ehr.referral(1)
    ehr.resources[("Task", "t1")]["status"] = "received"
    ehr.concurrent_edit.add("t1")
    report = AnswerReport()
    _move(FhirClient(BASE, retry=RetryPolicy(attempts=0)), dict(ehr.resources[("Task", "t1")]),
          DesiredTask("in-progress"), careplan_id="cp1", ctx=CTX, clock=lambda: NOW, report=report)
    stored = ehr.resources[("Task", "t1")]
    assert (report.conflicts, report.updated, report.problems) == (1, 2, [])
    assert stored["status"] == "in-progress" and stored["note"] == [{"text": "edited in the EHR"}]
    assert stored["output"][0]["valueReference"] == {"reference": "CarePlan/cp1"}


# -- skipped Tasks are re-read until delivered; the overlap window -------------------------------------------

def test_the_search_sends_since_minus_the_overlap_and_the_overlap_catches_a_late_task(
        tmp_path: Path, ehr: FakeEhr, ledger: Ledger) -> None:
    since = NOW - timedelta(minutes=30)
    ledger.set_meta(SINCE_KEY, since.isoformat())
    ehr.referral(1, last_updated=since - timedelta(minutes=5))  # committed late: inside the 10-minute overlap
    ehr.referral(2, last_updated=since - timedelta(minutes=15))  # older than the window: seen by an earlier pull
    summary = puller(tmp_path).run(ledger)
    (search,) = [q for m, p, q in ehr.requests if m == "GET" and p.endswith("/Task") and "owner" in q]
    assert search["_lastUpdated"] == ["ge" + (since - timedelta(minutes=10)).isoformat()]
    assert search["owner"] == ["Organization/org1"] and search["status"] == ["requested,received"]
    assert summary.delivered == 1 and intake_task_ids(tmp_path) == ["t1"]


def test_a_task_skipped_for_no_mrn_is_delivered_once_the_patient_has_one(tmp_path: Path, ehr: FakeEhr,
                                                                          ledger: Ledger) -> None:
    ehr.referral(1, mrn=None)
    summary = puller(tmp_path).run(ledger)
    assert [s["task"] for s in summary.skipped] == ["t1"] and summary.exit_code() == 65
    assert ledger.skipped_tasks() == {"t1": summary.skipped[0]["reason"]}

    ehr.referral(2, last_updated=NOW)  # a newer referral moves the incremental search past t1
    summary = puller(tmp_path).run(ledger)  # t1 still has no MRN: counted, not reported as new
    assert (summary.skipped, summary.still_skipped, summary.delivered, summary.exit_code()) == ([], 1, 1, 0)
    assert ledger.meta(SINCE_KEY) == NOW.isoformat()

    ehr.resources[("Patient", "p1")]["identifier"] = [{"system": MRN_SYSTEM, "value": "M1"}]  # the EHR fixes it
    summary = puller(tmp_path).run(ledger)  # the Task's lastUpdated did not change: found by its id
    assert (summary.delivered, summary.received, summary.still_skipped) == (1, 1, 0)
    assert sorted(intake_task_ids(tmp_path)) == ["t1", "t2"] and ledger.skipped_tasks() == {}
    assert any(p.endswith("/Task") and q.get("_id") == ["t1"] for _m, p, q in ehr.requests)


def test_a_skipped_task_the_ehr_closes_is_forgotten(tmp_path: Path, ehr: FakeEhr, ledger: Ledger) -> None:
    ehr.referral(1, mrn=None)
    puller(tmp_path).run(ledger)
    ehr.resources[("Task", "t1")]["status"] = "cancelled"
    summary = puller(tmp_path).run(ledger)
    assert ledger.skipped_tasks() == {} and summary.delivered == 0


# -- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", ["<html><body>Sign in</body></html>",
                                  json.dumps({"resourceType": "Bundle", "type": "collection", "entry": []})])
def test_a_malformed_task_search_answer_is_reported_and_the_run_goes_on(tmp_path: Path, ehr: FakeEhr,
                                                                      ledger: Ledger, body: str) -> None:
    ehr.referral(1)
    ehr.task_search_body = body
    summary = puller(tmp_path).run(ledger)
    assert summary.delivered == 0 and summary.exit_code() == 65
    assert summary.problems[0].startswith("referrals_in: GET /Task: the server answered")
    assert summary.referrals_report  # the next step ran
    assert ledger.meta(SINCE_KEY) is None  # nothing taken as "no match"


def test_a_task_of_another_organization_in_the_answer_is_skipped_and_untouched(tmp_path: Path, ehr: FakeEhr,
                                                                              ledger: Ledger) -> None:
    ehr.referral(1)
    ehr.referral(2, owner="other-org")  # the fake server ignores owner=, as a careless one would
    summary = puller(tmp_path).run(ledger)
    assert summary.skipped == [{"task": "t2", "reason": "owned by another organization"}]
    assert ehr.resources[("Task", "t2")]["status"] == "requested" and intake_task_ids(tmp_path) == ["t1"]
    assert ledger.skipped_tasks() == {}  # never the program's to wait for


# -- the organization's status is the organization's for good ------------------------------------------------

def _confirm_task(ledger: Ledger, referral_id: str, task_id: str, version: str) -> None:
    ledger.record_confirmed_many([ConfirmedUnit(
        f"referral:{referral_id}", "referral", "E1", f"h{version}", False, "p1",
        [("Task", CTX.system(KIND_REFERRAL_TASK), referral_id, task_id, version)], "sent")], run_id="r")


def test_a_version_peersync_writes_after_the_organizations_change_stays_the_organizations(
        ehr: FakeEhr, ledger: Ledger) -> None:
    client = FhirClient(BASE, retry=RetryPolicy(attempts=0))
    ehr.add({"resourceType": "Task", "id": "rt1", "status": "requested",
             "identifier": [{"system": CTX.system(KIND_REFERRAL_TASK), "value": "R1"}]})
    _confirm_task(ledger, "R1", "rt1", "1")
    assert fetch_referral_statuses(client, ledger, CTX)["R1"].changed_by == "program"
    assert organization_task_fields(client, ledger, CTX, ["R1"]) == {}

    ehr._bump(ehr.resources[("Task", "rt1")], {**ehr.resources[("Task", "rt1")], "status": "completed"})  # the CBO
    assert fetch_referral_statuses(client, ledger, CTX)["R1"].changed_by == "organization"
    assert ledger.organization_changes()["R1"] == {"task_id": "rt1", "version": "2", "status": "completed",
                                                   "changed_at": NOW.isoformat()}

    # Two program exports re-send the Task (keeping the organization's elements): versions peersync wrote.
    for version in ("3", "4"):
        ehr._bump(ehr.resources[("Task", "rt1")], {**ehr.resources[("Task", "rt1")], "note": [{"text": version}]})
        _confirm_task(ledger, "R1", "rt1", version)
        assert fetch_referral_statuses(client, ledger, CTX)["R1"].changed_by == "organization"
        assert set(organization_task_fields(client, ledger, CTX, ["R1"])) == {"R1"}


def test_with_the_ledger_lost_a_foreign_looking_version_is_not_made_sticky(ehr: FakeEhr, ledger: Ledger) -> None:
    ehr.add({"resourceType": "Task", "id": "rt1", "status": "requested",
             "identifier": [{"system": CTX.system(KIND_REFERRAL_TASK), "value": "R1"}]})
    client = FhirClient(BASE, retry=RetryPolicy(attempts=0))
    assert fetch_referral_statuses(client, ledger, CTX)["R1"].changed_by == "organization"
    assert ledger.organization_changes() == {}  # peersync's own version unknown: nothing remembered


# -- status and metrics of a pull ------------------------------------------------------------------------------

def test_a_pull_is_recorded_in_the_runs_and_shown_by_status(tmp_path: Path, ehr: FakeEhr, ledger: Ledger) -> None:
    from connector.ops.status import status_report

    ehr.referral(1, mrn=None)  # skipped: exit 65
    ehr.add({"resourceType": "Task", "id": "rt1", "status": "accepted", "lastModified": "2026-12-01T10:00:00+00:00",
             "identifier": [{"system": CTX.system(KIND_REFERRAL_TASK), "value": "R1"}]})
    ledger.start_run("sync-1", "sync")
    ledger.finish_run("sync-1", "ok", 0, {})
    summary = puller(tmp_path).run_recorded(ledger, "pull-1")
    assert summary.exit_code() == 65 and summary.duration_s is not None
    report = status_report(ledger.path)
    pulled = report["last_pull"]
    assert (pulled["run_id"], pulled["exit_code"], pulled["outcome"]) == ("pull-1", 65, "partial")
    assert pulled["counts"]["skipped"] == 1
    assert report["last_run"]["run_id"] == "sync-1" and report["last_success"]["run_id"] == "sync-1"
    assert [r["run_id"] for r in report["runs"]] == ["sync-1"]  # the sync history stays the sync's
    assert report["referrals"]["community_referrals"] == [
        {"referral_id": "R1", "status": "accepted", "changed_at": "2026-12-01T10:00:00+00:00",
         "changed_by": "organization"}]
    assert report["referrals"]["clinic_referrals_waiting"] == [
        {"task": "t1", "reason": f"Patient/p1 has no MRN in the configured system ({MRN_SYSTEM})"}]
    assert "Delgado" not in json.dumps(report)


def test_a_pull_stopped_by_an_error_is_recorded_with_its_exit_code(tmp_path: Path, ledger: Ledger) -> None:
    from connector.errors import ExitCode
    from connector.ops.status import status_report

    with responses.RequestsMock() as mock:  # the program's Organization is not on the server: 78
        mock.add(responses.GET, f"{BASE}/Organization",
                 json={"resourceType": "Bundle", "type": "searchset", "entry": []})
        with pytest.raises(Exception, match="Organization"):
            puller(tmp_path).run_recorded(ledger, "pull-2")
    pulled = status_report(ledger.path)["last_pull"]
    assert (pulled["exit_code"], pulled["outcome"]) == (ExitCode.CONFIG_ERROR, "failed") and pulled["error"]


def test_pull_metrics_have_their_own_names_and_file() -> None:
    from connector.ops.metrics import parse_samples, pull_metrics_path, render_pull

    assert pull_metrics_path(Path("/m/peersync.prom")) == Path("/m/peersync-pull.prom")
    summary = {"exit_code": 65, "duration_s": 1.5, "counts": {"delivered": 2, "skipped": 1},
               "referral_statuses": {"completed": 1, "requested": 3}}
    first = parse_samples(render_pull(summary, now=1000))
    assert first['peersync_pull_last_run_referrals{outcome="delivered"}'] == 2
    assert first['peersync_pull_community_referrals{status="requested"}'] == 3
    assert first['peersync_pull_last_success_timestamp_seconds'] == 1000
    assert all(name.startswith("peersync_pull_") for name in first)  # never a name the sync's file defines
    second = parse_samples(render_pull({"exit_code": 69}, now=2000, previous=first))
    assert second['peersync_pull_last_success_timestamp_seconds'] == 1000  # kept over a failed pull
    assert second['peersync_pull_runs_total{exit_code="65"}'] == 1
    assert second['peersync_pull_runs_total{exit_code="69"}'] == 1


def test_a_task_the_ehr_sets_back_to_requested_is_acknowledged_not_delivered_twice(tmp_path: Path, ehr: FakeEhr,
                                                                                    ledger: Ledger) -> None:
    ehr.referral(1)
    assert puller(tmp_path).run(ledger).received == 1
    task = ehr.resources[("Task", "t1")]
    ehr._bump(task, {**task, "status": "requested"})  # the EHR reopens it (a new version)
    summary = puller(tmp_path).run(ledger)
    assert (summary.delivered, summary.already_delivered, summary.received) == (0, 1, 1)
    assert summary.problems == ["Task/t1: requested again in the EHR (version 3) after it was delivered to intake; "
                                "not delivered twice: the program's intake row stands"]
    assert intake_task_ids(tmp_path) == ["t1"] and ehr.resources[("Task", "t1")]["status"] == "received"


def test_with_mark_received_off_the_task_keeps_its_status_and_gets_the_tag_once(tmp_path: Path, ehr: FakeEhr,
                                                                                 ledger: Ledger) -> None:
    ehr.referral(1)
    summary = puller(tmp_path, mark_received=False).run(ledger)
    stored = ehr.resources[("Task", "t1")]
    assert (summary.delivered, summary.received, summary.problems) == (1, 1, [])
    assert stored["status"] == "requested" and stored["meta"]["versionId"] == "2"
    assert stored["meta"]["tag"] == [{"system": f"{CTX.meta_source}/pull", "code": "delivered-to-intake"}]
    summary = puller(tmp_path, mark_received=False).run(ledger)  # found again: tagged, nothing written
    assert (summary.delivered, summary.already_delivered, summary.received, summary.problems) == (0, 1, 0, [])
    assert ehr.resources[("Task", "t1")]["meta"]["versionId"] == "2"


def test_a_delivered_task_handed_to_another_owner_is_reported_once_and_no_longer_re_read(
        tmp_path: Path, ehr: FakeEhr, ledger: Ledger) -> None:
    ehr.referral(1)
    ehr.put_failures["t1"] = [422]  # delivered, not received: re-read by id on the next pull
    puller(tmp_path).run(ledger)
    ehr.resources[("Task", "t1")]["owner"] = {"reference": "Organization/other-org"}
    ehr.resources[("Task", "t1")]["meta"]["lastUpdated"] = (NOW - timedelta(days=1)).isoformat()
    summary = puller(tmp_path).run(ledger)
    assert summary.skipped == [{"task": "t1", "reason": "owned by another organization"}]
    assert ledger.pulled_tasks() == {"t1": "closed"}
    ehr.requests.clear()
    summary = puller(tmp_path).run(ledger)
    assert summary.skipped == [] and not any(q.get("_id") for _m, _p, q in ehr.requests)
