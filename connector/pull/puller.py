"""``peersync pull``: the I/O around :mod:`.inbound`, :mod:`.community` and :mod:`.clinical`.

Order of a clinic referral's delivery, so that a crash at any point neither loses nor repeats it:
1. the intake row is written and flushed to disk;
2. the ledger records the Task id as delivered;
3. the Task moves to ``received`` (``If-Match``: a concurrent edit in the EHR answers 412; peersync re-reads and
   re-applies) and gets peersync's delivered tag.
A referral is delivered once per Task id: the ledger, the intake folder and the tag on the server each say
"delivered", so a re-run after a crash between the steps, or with the ledger lost, writes no second row.

One referral's failure (a Task the server refuses, or deleted meanwhile) is reported and never blocks the others;
Tasks skipped for a reason the EHR can fix, and Tasks delivered but not yet received, are re-read by id on every
pull (a fix on the Patient does not change the Task's lastUpdated, so the incremental search would miss them).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from connector.errors import ConfigError, PeersyncError
from connector.identifiers import KIND_ORGANIZATION, KIND_REFERRAL_TASK, identifier_value, token_query
from connector.map.context import MappingContext
from connector.model import Enrollment, Goal, RecordKind, TargetMeasure
from connector.ops.logs import RUN_ID
from connector.plan.ledger import Ledger
from connector.pull import clinical
from connector.pull.answers import VERSION_CONFLICT
from connector.pull.community import ReferralStatus, referral_status
from connector.pull.inbound import (
    DELIVERED_TAG_CODE,
    OPEN_STATUSES,
    InboundReferral,
    SkippedTask,
    inbound_referrals,
    ref_id,
)
from connector.pull.intake import REFERRAL_FIELD, IntakeFile, delivered_task_ids, intake_columns, write_rows
from connector.read.profile import Profile
from connector.server.client import Action, FhirClient, FhirHttpError, ServerAnswerError

log = logging.getLogger(__name__)

SINCE_KEY = "pull.tasks.since"
PAGE_SIZE = "100"
MAX_MATCH_RETRIES = 3  # re-read and re-apply after a version conflict at most this often


@dataclass(frozen=True)
class PullOptions:
    """Everything a pull needs besides the client."""

    ctx: MappingContext
    profile: Profile
    inputs: list[Path]
    intake_dir: Path
    reports_dir: Path
    overlap: timedelta = timedelta(minutes=10)
    accepted_codes: frozenset[str] = frozenset()
    program_organization: tuple[str, str] | None = None  # (system, value); None: the one peersync writes
    clinical_facts: bool = False
    file_mode: int = 0o600
    mark_received: bool = True  # False: tag delivered Tasks only (SDOH CC's referral Task statuses exclude received)


@dataclass
class PullSummary:
    """What a pull did, in counts and ids (no patient data): printed, stored in the ledger's runs."""

    delivered: int = 0  # new intake rows
    already_delivered: int = 0
    received: int = 0  # Tasks moved to received (with pull.mark_received off: tagged delivered)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {task, reason}: newly skipped
    still_skipped: int = 0  # skipped before, re-read, still not deliverable (`peersync status` lists them)
    concurrent_edits: int = 0  # 412 answers re-applied
    intake_file: str | None = None
    referral_statuses: Counter[str] = field(default_factory=Counter)
    changed_by_organization: int = 0
    referrals_report: str | None = None
    clinical_participants: int = 0
    clinical_file: str | None = None
    clinical_requests: int = 0
    problems: list[str] = field(default_factory=list)
    duration_s: float | None = None
    error: str | None = None  # the error that stopped the pull (exit 69, 77, 78...), no patient data
    error_exit_code: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = dict(self.__dict__)
        out["referral_statuses"] = dict(self.referral_statuses)
        out["counts"] = self.counts()
        out["exit_code"] = self.exit_code()
        out["outcome"] = self.outcome()
        return out

    def counts(self) -> dict[str, int]:
        """What `peersync status` and the metrics show of a pull (counts only)."""
        return {"delivered": self.delivered, "already_delivered": self.already_delivered, "received": self.received,
                "skipped": len(self.skipped), "still_skipped": self.still_skipped,
                "concurrent_edits": self.concurrent_edits, "changed_by_organization": self.changed_by_organization,
                "clinical_participants": self.clinical_participants, "clinical_requests": self.clinical_requests,
                "problems": len(self.problems)}

    def exit_code(self) -> int:
        """The error's exit code if one stopped the pull; else 0, or 65 when a referral was newly skipped or a step
        reported a problem (a person should look)."""
        if self.error_exit_code is not None:
            return self.error_exit_code
        return 65 if self.skipped or self.problems else 0

    def outcome(self) -> str:
        """As a sync's (docs/operations.md): ok, partial (65), incomplete (69) or failed."""
        from connector.run import outcome_of_error

        if self.error_exit_code is not None:
            return outcome_of_error(self.error_exit_code)
        return "partial" if self.exit_code() else "ok"


class Puller:
    """One pull. Construct, then call :meth:`run`."""

    def __init__(self, opts: PullOptions, client: FhirClient, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.opts = opts
        self.client = client
        self.clock = clock
        self.summary = PullSummary()

    @property
    def tag_system(self) -> str:
        """The meta.tag system of peersync's marks on other systems' resources."""
        return f"{self.opts.ctx.meta_source}/pull"

    def run_recorded(self, ledger: Ledger, run_id: str) -> PullSummary:
        """:meth:`run`, recorded in the ledger's runs (command ``pull``) so that `peersync status` shows it, also
        when an error stops it (the error is re-raised after it is recorded)."""
        ledger.start_run(run_id, "pull")
        started = time.monotonic()
        try:
            self.run(ledger)
        except PeersyncError as exc:
            self.summary.error, self.summary.error_exit_code = str(exc)[:300], int(exc.exit_code)
            raise
        except Exception as exc:  # a bug: recorded as failed (exit 1), never as "ok"
            self.summary.error, self.summary.error_exit_code = f"unexpected {type(exc).__name__}", 1
            raise
        finally:
            self.summary.duration_s = round(time.monotonic() - started, 3)
            ledger.finish_run(run_id, self.summary.outcome(), self.summary.exit_code(), self.summary.as_dict())
        return self.summary

    def run(self, ledger: Ledger) -> PullSummary:
        """Referrals in, referral statuses, then (if enabled) clinical facts; each step goes on if another fails."""
        for step in (self.referrals_in, self.referral_statuses, self.clinical_facts):
            try:
                step(ledger)
            except (FhirHttpError, ServerAnswerError) as exc:
                self.summary.problems.append(f"{step.__name__}: {exc}"[:300])
                log.warning("pull step failed: %s", step.__name__, extra={"event": "pull-step-failed"})
        return self.summary

    # -- 1. referrals into the program -----------------------------------------------------------------

    def _program_organization_id(self) -> str:
        system, value = self.opts.program_organization or (
            self.opts.ctx.system(KIND_ORGANIZATION), identifier_value(self.opts.ctx.program_id))
        found = self.client.search_raw(f"Organization?identifier={token_query(system, value)}")
        if len(found) != 1:
            raise ConfigError(
                f"the program's Organization ({system}|{value}) is {'not' if not found else 'more than once'} on "
                "the server: run peersync sync first, or set pull.program_organization to the identifier the EHR "
                "holds for the program")
        return str(found[0]["id"])

    def referrals_in(self, ledger: Ledger) -> None:
        """Deliver new clinic referrals to an intake file and move their Tasks to ``received``.

        The search is incremental (``_lastUpdated`` from the newest Task seen, minus the overlap window), and the
        Tasks it can no longer find are re-read by id: those skipped for a reason the EHR may fix without touching
        the Task (an MRN added to the Patient, a ServiceRequest corrected) and those delivered but not yet
        ``received``. One referral's failure is reported and never blocks the others.
        """
        owner_id = self._program_organization_id()
        started = self.clock()
        includes = ["Task:focus", "Task:patient", "Task:requester"]
        params: dict[str, Any] = {"owner": f"Organization/{owner_id}", "status": ",".join(OPEN_STATUSES),
                                  "_include": includes, "_count": PAGE_SIZE}
        since = ledger.meta(SINCE_KEY)
        if since:
            params["_lastUpdated"] = "ge" + (datetime.fromisoformat(since) - self.opts.overlap).isoformat()
        tasks, included = self.client.search_with_included("Task", params)
        newest = max((str((t.get("meta") or {}).get("lastUpdated", "")) for t in tasks), default="")
        known = ledger.pulled_tasks()
        waiting = ledger.skipped_tasks()
        found_ids = {str(t.get("id")) for t in tasks}
        reread = sorted(t for t in {*waiting, *(t for t, state in known.items() if state == "delivered")}
                        if t not in found_ids)
        for start in range(0, len(reread), 100):
            more, more_included = self.client.search_with_included(
                "Task", {"_id": ",".join(reread[start:start + 100]), "_include": includes, "_count": PAGE_SIZE})
            tasks += more
            included += more_included
        by_key = {(r["resourceType"], str(r.get("id"))): r for r in included}
        referrals, skipped = inbound_referrals(
            tasks, by_key, owner_id=owner_id, mrn_system=self.opts.ctx.mrn_system,
            accepted_codes=self.opts.accepted_codes, tag_system=self.tag_system)
        self._record_skipped(ledger, tasks, skipped, referrals, waiting=waiting, known=known, owner_id=owner_id,
                             reread=set(reread))
        columns = intake_columns(self.opts.profile)
        in_folder = delivered_task_ids(self.opts.intake_dir, columns[REFERRAL_FIELD])
        intake = IntakeFile(self.opts.intake_dir, columns, started=started, mode=self.opts.file_mode)
        try:
            for referral in referrals:
                if referral.task_id in known or referral.task_id in in_folder or referral.delivered_before:
                    self.summary.already_delivered += 1
                    if self.opts.mark_received and known.get(referral.task_id) in ("received", "closed") \
                            and referral.task_status == "requested":
                        # Delivered once per Task id (docs/care-coordination.md): a Task the EHR sets back to
                        # requested is the same referral; acknowledged again, not a second intake row.
                        self.summary.problems.append(
                            f"Task/{referral.task_id}: requested again in the EHR (version {referral.task_version}) "
                            "after it was delivered to intake; not delivered twice: the program's intake row stands")
                else:
                    intake.write(referral)
                    self.summary.delivered += 1
                done = referral.delivered_before and (referral.task_status == "received"
                                                      or not self.opts.mark_received)
                ledger.record_pulled_task(referral.task_id, version=referral.task_version,
                                          service_request_id=referral.service_request_id,
                                          state="received" if done else "delivered", run_id=RUN_ID.get())
                if not done:
                    self._mark_received_isolated(ledger, referral)
        finally:
            intake.close()
        if intake.rows:
            self.summary.intake_file = str(intake.path)
        if newest:
            ledger.set_meta(SINCE_KEY, newest)

    def _record_skipped(self, ledger: Ledger, tasks: list[dict[str, Any]], skipped: list[SkippedTask],
                        referrals: list[InboundReferral], *, waiting: dict[str, str], known: dict[str, str],
                        owner_id: str, reread: set[str]) -> None:
        """Report the skipped Tasks (a new skip once, as a problem; one still waiting as a count) and keep in the
        ledger those the EHR may still fix (open, the program's): re-read on every pull until delivered or closed."""
        by_id = {str(t.get("id")): t for t in tasks if t.get("id")}
        keep: dict[str, str] = {}
        for skip in skipped:
            task = by_id.get(skip.task_id, {})
            fixable = (task.get("status") in OPEN_STATUSES and ref_id(task.get("owner"), "Organization") == owner_id)
            if fixable:
                keep[skip.task_id] = skip.reason
            elif skip.task_id in known:  # delivered before, then closed or handed to another owner in the EHR
                ledger.record_pulled_task(skip.task_id, version=str((task.get("meta") or {}).get("versionId", "")),
                                          service_request_id="", state="closed", run_id=RUN_ID.get())
                if task.get("status") not in OPEN_STATUSES:
                    continue  # the EHR ended it: nothing to report
            if skip.task_id in waiting and fixable and waiting[skip.task_id] == skip.reason:
                self.summary.still_skipped += 1  # reported when it was first skipped; `status` lists it
                continue
            self.summary.skipped.append({"task": skip.task_id, "reason": skip.reason})
            log.warning("clinic referral skipped: Task/%s: %s", skip.task_id, skip.reason,
                        extra={"event": "referral-skipped"})
        resolved = {*(r.task_id for r in referrals), *(t for t in waiting if t not in keep)}
        gone = reread - set(by_id)  # deleted on the EHR (or no longer readable): nothing left to wait for
        for task_id in gone & {t for t, state in known.items() if state == "delivered"}:
            ledger.record_pulled_task(task_id, version="", service_request_id="", state="closed", run_id=RUN_ID.get())
        ledger.record_skipped_tasks(keep, resolved=resolved | gone, run_id=RUN_ID.get())

    def _mark_received_isolated(self, ledger: Ledger, referral: InboundReferral) -> None:
        """:meth:`_mark_received`, with a failure of this one Task reported (no patient data: the Task id, the
        HTTP status and the server's issue codes) instead of ending the step: the other referrals still land. The
        server unreachable, credentials refused or rate limits after the retries still end the step."""
        try:
            self._mark_received(ledger, referral)
        except FhirHttpError as exc:
            if exc.action in (Action.AUTH, Action.RETRY_LATER, Action.FATAL):
                raise
            self._referral_problem(referral, f"HTTP {exc.status}" + (f" {exc.outcome.codes()}"
                                                                     if exc.outcome.issues else ""))
        except ServerAnswerError:
            self._referral_problem(referral, "the server's answer was not a FHIR resource")

    def _referral_problem(self, referral: InboundReferral, reason: str) -> None:
        self.summary.problems.append(f"Task/{referral.task_id}: not moved to received ({reason}); it is in the "
                                     "intake file, and the next pull tries again")
        log.warning("clinic referral Task not moved to received: Task/%s: %s", referral.task_id, reason,
                    extra={"event": "referral-receive-failed"})

    def _mark_received(self, ledger: Ledger, referral: InboundReferral) -> None:
        """Move the Task to ``received`` (with ``pull.mark_received`` off: leave its status) with peersync's
        delivered tag, never over a concurrent edit."""
        task = self.client.read("Task", referral.task_id)
        for _attempt in range(MAX_MATCH_RETRIES):
            if task.get("status") not in OPEN_STATUSES:
                self.summary.problems.append(f"Task/{referral.task_id} became {task.get('status')!r} in the EHR "
                                             "after it was delivered to intake")
                return
            version = str((task.get("meta") or {}).get("versionId", ""))
            updated = dict(task)
            target = "received" if self.opts.mark_received else str(task.get("status"))
            if updated.get("status") != target:
                updated["status"] = target
                updated["lastModified"] = self.clock().isoformat(timespec="seconds")
            meta = dict(updated.get("meta") or {})
            tags = [t for t in meta.get("tag", []) if t.get("system") != self.tag_system]
            meta["tag"] = [*tags, {"system": self.tag_system, "code": DELIVERED_TAG_CODE}]
            updated["meta"] = {"tag": meta["tag"]}
            try:
                stored = self.client.update_versioned("Task", referral.task_id, updated, version)
            except FhirHttpError as exc:
                if exc.status not in VERSION_CONFLICT:
                    raise
                self.summary.concurrent_edits += 1
                log.info("Task changed in the EHR meanwhile (HTTP %s): re-read and re-applied", exc.status,
                         extra={"event": "task-concurrent-edit"})
                task = self.client.read("Task", referral.task_id)
                continue
            if stored.get("status") != target:  # believed only when the stored Task says so
                self.summary.problems.append(f"Task/{referral.task_id}: the server's answer does not show it "
                                             f"{target}; the next pull tries again")
                return
            ledger.record_pulled_task(referral.task_id, version=version, service_request_id=referral.service_request_id,
                                      state="received", run_id=RUN_ID.get())
            self.summary.received += 1
            return
        self.summary.problems.append(f"Task/{referral.task_id}: still changing in the EHR after "
                                     f"{MAX_MATCH_RETRIES} tries; the next pull moves it to received")

    # -- 3. community referrals back to the program ----------------------------------------------------

    def referral_statuses(self, ledger: Ledger) -> None:
        """The status of every referral Task peersync wrote, as the server holds it: referrals.csv/json (0600)."""
        system = self.opts.ctx.system(KIND_REFERRAL_TASK)
        statuses = fetch_referral_statuses(self.client, ledger, self.opts.ctx)
        ledger.record_referral_statuses([(s.referral_id, s.task_id, s.version, s.status, s.changed_at, s.changed_by)
                                         for s in statuses.values()])
        rows = [s.as_row() for s in sorted(statuses.values(), key=lambda s: s.referral_id)]
        self.summary.referral_statuses = Counter(s.status for s in statuses.values())
        self.summary.changed_by_organization = sum(s.changed_by == "organization" for s in statuses.values())
        csv_path = self.opts.reports_dir / "referrals.csv"
        fields = ["referral_id", "task_id", "version", "status", "changed_at", "changed_by", "status_reason",
                  "business_status", "outputs"]
        write_rows(csv_path, rows, fields, self.opts.file_mode)
        write_rows_json(self.opts.reports_dir / "referrals.json", rows, self.opts.file_mode)
        self.summary.referrals_report = str(csv_path)
        log.info("referral statuses read: %d referral(s), %d changed by the organization", len(rows),
                 self.summary.changed_by_organization, extra={"event": "referral-statuses", "system": system})

    # -- 4. clinical facts, with consent only ----------------------------------------------------------

    def clinical_facts(self, ledger: Ledger) -> None:
        """Latest HbA1c and blood pressure and upcoming appointments of consenting participants (0600 file)."""
        if not self.opts.clinical_facts:
            return
        enrollments, goals = self._consenting_records()
        patients = ledger.participant_patients()
        today = self.clock().date().isoformat()
        rows: list[dict[str, Any]] = []
        for enrollment in enrollments:
            patient_id = patients.get(enrollment.enrollment_id)
            if not patient_id:
                self.summary.problems.append(f"enrollment {enrollment.enrollment_id}: consent recorded but no "
                                             "matched Patient yet (run peersync sync first)")
                continue
            # One newest-first search of one per code: a shared page of many readings of one kind (blood
            # pressure at every visit) would hide an older HbA1c.
            targeted = {g.target.measure for g in goals.get(enrollment.enrollment_id, []) if g.target}
            latest = {measure: found for measure, code in clinical.EHR_MEASURES.items()
                      if (measure is TargetMeasure.HBA1C or measure in targeted)
                      and (found := clinical.latest_quantity(self._latest(patient_id, code), code))}
            a1c = latest.get(TargetMeasure.HBA1C)
            bp = clinical.latest_blood_pressure(self._latest(patient_id, clinical.BP_PANEL))
            appointments = self._search("Appointment", {"patient": patient_id, "date": f"ge{today}",
                                                        "_sort": "date", "_count": "10"})
            progress = [f"{g.goal_id}: {p}" for g in goals.get(enrollment.enrollment_id, [])
                        if (p := clinical.target_progress(g.target, latest))]
            rows.append({
                "enrollment_id": enrollment.enrollment_id, "mrn": enrollment.mrn,
                "hba1c": f"{a1c.value} {a1c.unit}".strip() if a1c else "",
                "hba1c_date": a1c.date if a1c else "",
                "hba1c_observation": a1c.observation if a1c else "",
                "blood_pressure": f"{bp.value} {bp.unit}".strip() if bp else "",
                "blood_pressure_date": bp.date if bp else "",
                "upcoming_appointments": "; ".join(clinical.upcoming_appointments(appointments, today=today)),
                "goal_targets": "; ".join(progress),
            })
        path = self.opts.reports_dir / "clinical-facts.csv"
        write_rows(path, rows, ["enrollment_id", "mrn", "hba1c", "hba1c_date", "hba1c_observation", "blood_pressure",
                                "blood_pressure_date", "upcoming_appointments", "goal_targets"], self.opts.file_mode)
        self.summary.clinical_participants = len(rows)
        self.summary.clinical_file = str(path)

    def _latest(self, patient_id: str, code: str) -> list[dict[str, Any]]:
        """The patient's newest usable Observation with LOINC ``code`` (a list of at most one)."""
        return self._search("Observation", {"patient": patient_id, "code": f"{clinical.LOINC}|{code}",
                                            "status": ",".join(clinical.USABLE_STATUSES), "_sort": "-date",
                                            "_count": "1"})

    def _search(self, resource_type: str, params: dict[str, str]) -> list[dict[str, Any]]:
        self.summary.clinical_requests += 1
        matches, _ = self.client.search_with_included(resource_type, params, max_pages=1)
        return matches

    def _consenting_records(self) -> tuple[list[Enrollment], dict[str, list[Goal]]]:
        """The enrollments that record consent (and their goals), read from the program's inputs."""
        from connector.read.program import read_program
        from connector.read.staging import Staging

        with tempfile.TemporaryDirectory(prefix="peersync-pull-") as tmp, \
                Staging(Path(tmp) / "staging.sqlite") as staging:
            read_program(self.opts.profile, self.opts.inputs, staging)
            enrollments = [r for r in staging.records(RecordKind.ENROLLMENT)
                           if isinstance(r, Enrollment) and r.clinical_consent and not r.void]
            consenting = {e.enrollment_id for e in enrollments}
            goals: dict[str, list[Goal]] = {}
            for record in staging.records(RecordKind.GOAL):
                if isinstance(record, Goal) and record.enrollment_id in consenting:
                    goals.setdefault(record.enrollment_id, []).append(record)
        return enrollments, goals


def fetch_referral_statuses(client: FhirClient, ledger: Ledger, ctx: MappingContext,
                            ids: list[str] | None = None) -> dict[str, ReferralStatus]:
    """Referral id -> status of peersync's referral Tasks on the server (all, or those with server ``ids``)."""
    system = ctx.system(KIND_REFERRAL_TASK)
    confirmed = ledger.confirmed_versions("Task", system)
    tasks: list[dict[str, Any]] = []
    if ids is None:
        tasks, _ = client.search_with_included("Task", {"identifier": f"{system}|", "_count": "200"}, max_pages=500)
    else:
        for start in range(0, len(ids), 100):
            found, _ = client.search_with_included("Task", {"_id": ",".join(ids[start:start + 100]),
                                                            "_count": "100"})
            tasks.extend(found)
    changed_before = ledger.organization_changes()
    out: dict[str, ReferralStatus] = {}
    newly_changed: list[tuple[str, str, str, str, str]] = []
    for task in tasks:
        value = next((str(i.get("value")) for i in task.get("identifier", []) if i.get("system") == system), None)
        written = {v for v in [confirmed.get(value or "", (None, None))[1]] if v}
        if task.get("status") == "entered-in-error":  # voided by peersync: its own version bump
            written.add(str((task.get("meta") or {}).get("versionId", "")))
        status = referral_status(task, referral_system=system, written_versions=written,
                                 organization_changed=(value or "") in changed_before
                                 and task.get("status") != "entered-in-error")
        if status is None:
            continue
        out[status.referral_id] = status
        # Remembered only when the ledger knows peersync's own version (with the ledger lost, every version looks
        # foreign: reported as the organization's, never made sticky).
        if status.changed_by == "organization" and written and status.version not in written \
                and changed_before.get(status.referral_id, {}).get("version") != status.version:
            newly_changed.append((status.referral_id, status.task_id, status.version, status.status,
                                  status.changed_at))
    if newly_changed:
        ledger.record_organization_changes(newly_changed)
    return out


def organization_task_fields(client: FhirClient, ledger: Ledger, ctx: MappingContext,
                             referral_ids: list[str]) -> dict[str, Mapping[str, Any]]:
    """For the referrals a sync is about to re-send: the server's Task of each one the organization has ever
    changed (referral id -> Task), so the mapper keeps the organization's status. Ownership is sticky: the ledger
    remembers the organization's change, so a version peersync wrote afterwards (keeping the organization's
    elements) does not hand the status back to the program's export."""
    if not referral_ids:
        return {}
    system = ctx.system(KIND_REFERRAL_TASK)
    confirmed = ledger.confirmed_versions("Task", system)
    server_ids = [sid for rid in referral_ids if (sid := confirmed.get(identifier_value(rid), (None, None))[0])]
    statuses = fetch_referral_statuses(client, ledger, ctx, server_ids)
    return {rid: s.task for rid, s in statuses.items() if s.changed_by == "organization"}


def write_rows_json(path: Path, rows: list[dict[str, Any]], mode: int) -> None:
    """The same rows as JSON (created with ``mode``)."""
    from connector.files import write_atomically

    write_atomically(path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n", mode)
