"""The program answers clinic referrals through its normal export: an enrollment row that names the clinic's
referral Task (``clinic_referral``) moves that Task on the EHR, so the referring clinician sees the status without
anyone typing it twice (SDOH Clinical Care, Task for referral management):

=========================  =====================================================================================
enrollment status          the clinic's Task
=========================  =====================================================================================
active                     accepted, then in-progress; ``output`` the program's CarePlan
on-hold                    on-hold (after accepted)
completed                  completed; ``output`` the CarePlan and a summary (contacts, goals achieved)
declined / not-reached     cancelled with a coded statusReason: the person declined or could not be reached; SDOH
                           CC keeps ``rejected`` for a performer that decides not to do it (the program never does)
withdrawn                  cancelled (after it was accepted) with a coded statusReason
=========================  =====================================================================================

A Task the EHR already ended (completed, cancelled, rejected, failed, entered-in-error) is never touched, and every
update carries ``If-Match``: a concurrent edit in the EHR is re-read and the change re-applied, never overwritten.
The decisions are pure (:func:`task_steps`, :func:`desired_task`); :func:`answer_clinic_referrals` does the I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from connector.identifiers import KIND_CAREPLAN, identifier_value
from connector.map.codes import SNOMED_PROCEDURE_DECLINED
from connector.map.context import MappingContext
from connector.model import Contact, ContactOutcome, Enrollment, EnrollmentStatus, Goal, GoalAchievement
from connector.plan.ledger import Ledger
from connector.server.client import FhirClient, FhirHttpError

log = logging.getLogger(__name__)

ENDED = frozenset({"completed", "cancelled", "rejected", "failed", "entered-in-error"})
NOT_STARTED = frozenset({"draft", "requested", "received"})
# An If-Match that no longer matches: 412 as FHIR specifies; HAPI answers 409 (HAPI-0989).
VERSION_CONFLICT = (409, 412)
MAX_TRIES = 3
STATUS_REASON_SYSTEM = "referral-status-reason"  # our CodeSystem (mappings/terminology)
REASONS = {
    EnrollmentStatus.DECLINED: ("participant-declined", "Participant declined"),
    EnrollmentStatus.NOT_REACHED: ("not-reachable", "Could not be reached"),
    EnrollmentStatus.WITHDRAWN: ("participant-withdrew", "Participant withdrew"),
}


@dataclass(frozen=True)
class DesiredTask:
    """Where the enrollment says the clinic's Task should end up, and what it should carry."""

    status: str
    reason: tuple[str, str] | None = None  # (code, display) in our referral-status-reason CodeSystem
    summary: str | None = None  # for a completed enrollment: what the program did


def desired_task(enrollment: Enrollment, contacts: Iterable[Contact], goals: Iterable[Goal]) -> DesiredTask:
    """The Task status an enrollment means (pure)."""
    status = enrollment.status
    if status in (EnrollmentStatus.DECLINED, EnrollmentStatus.NOT_REACHED, EnrollmentStatus.WITHDRAWN):
        return DesiredTask("cancelled", REASONS[status])
    if status is EnrollmentStatus.ON_HOLD:
        return DesiredTask("on-hold")
    if status is EnrollmentStatus.COMPLETED:
        done = [c for c in contacts if not c.void and c.outcome is ContactOutcome.COMPLETED]
        live = [g for g in goals if not g.void]
        achieved = [g for g in live if g.achievement_status is GoalAchievement.ACHIEVED]
        return DesiredTask("completed", summary=f"{len(done)} peer support contact(s); {len(achieved)} of "
                                                f"{len(live)} goal(s) achieved")
    return DesiredTask("in-progress")


def task_steps(current: str, desired: str) -> list[str]:
    """The statuses to move a Task through, in order, from ``current`` to ``desired`` (pure). An ended Task is
    never moved; a Task not yet accepted is accepted first, unless it is cancelled."""
    if current in ENDED or current == desired:
        return []
    if desired == "cancelled":
        return ["cancelled"]
    steps = ["accepted"] if current in NOT_STARTED else []
    if desired == "completed" and current != "in-progress":
        steps.append("in-progress")
    if desired != "accepted":
        steps.append(desired)
    return steps


def apply_step(task: Mapping[str, Any], status: str, desired: DesiredTask, *, careplan_id: str | None,
               now: str, ctx: MappingContext) -> dict[str, Any]:
    """The Task with one status step applied (pure)."""
    out = dict(task)
    out.pop("meta", None)
    out["status"] = status
    out["lastModified"] = now
    if status == "cancelled" and desired.reason:
        code, display = desired.reason
        codings = [{"system": ctx.code_system(STATUS_REASON_SYSTEM), "code": code, "display": display}]
        if code == "participant-declined":  # the standard code beside ours (docs/fhir-modeling-corrections.md)
            codings.append(dict(SNOMED_PROCEDURE_DECLINED))
        out["statusReason"] = {"coding": codings, "text": display}
    outputs = [o for o in out.get("output", []) if not _is_ours(o)]
    if careplan_id and status in ("in-progress", "on-hold", "completed"):
        outputs.append({"type": {"text": "Peer support care plan"},
                        "valueReference": {"reference": f"CarePlan/{careplan_id}"}})
    if status == "completed" and desired.summary:
        outputs.append({"type": {"text": "Peer support summary"}, "valueString": desired.summary})
    if outputs:
        out["output"] = outputs
    return out


def _is_ours(output: Mapping[str, Any]) -> bool:
    return (output.get("type") or {}).get("text") in ("Peer support care plan", "Peer support summary")


@dataclass
class AnswerReport:
    """What answering clinic referrals did (ids and counts only)."""

    updated: int = 0  # status steps written
    conflicts: int = 0  # concurrent EHR edits re-read and re-applied
    problems: list[str] = field(default_factory=list)


def clinic_referral_requests(client: FhirClient, task_ids: Iterable[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """Task id -> ServiceRequest id (its focus) for the clinic referrals enrollments answer, and the Tasks."""
    ids = sorted(set(task_ids))
    tasks: dict[str, Any] = {}
    for start in range(0, len(ids), 100):
        found, _ = client.search_with_included("Task", {"_id": ",".join(ids[start:start + 100]), "_count": "100"})
        tasks.update({str(t["id"]): t for t in found if t.get("id")})
    requests = {}
    for task_id, task in tasks.items():
        focus = str((task.get("focus") or {}).get("reference") or "")
        if focus.startswith("ServiceRequest/"):
            requests[task_id] = focus.split("/", 1)[1]
    return requests, tasks


def answer_clinic_referrals(client: FhirClient, ledger: Ledger, ctx: MappingContext,
                            answers: Mapping[str, tuple[Enrollment, DesiredTask]], *,
                            clock: Callable[[], datetime]) -> AnswerReport:
    """Move each answered clinic referral's Task towards what its enrollment says (If-Match on every write)."""
    report = AnswerReport()
    if not answers:
        return report
    _requests, tasks = clinic_referral_requests(client, answers)
    careplans = ledger.confirmed_versions("CarePlan", ctx.system(KIND_CAREPLAN))
    for task_id, (enrollment, desired) in sorted(answers.items()):
        task = tasks.get(task_id)
        if task is None:
            report.problems.append(f"enrollment {enrollment.enrollment_id}: clinic referral Task/{task_id} is not "
                                   "on the server (check the clinic_referral column)")
            continue
        careplan_id = careplans.get(identifier_value(enrollment.enrollment_id), (None, None))[0]
        _move(client, task, desired, careplan_id=careplan_id, ctx=ctx, clock=clock, report=report)
    return report


def _move(client: FhirClient, task: dict[str, Any], desired: DesiredTask, *, careplan_id: str | None,
          ctx: MappingContext, clock: Callable[[], datetime], report: AnswerReport) -> None:
    task_id = str(task["id"])
    for _try in range(MAX_TRIES):
        steps = task_steps(str(task.get("status")), desired.status)
        try:
            for status in steps:
                version = str((task.get("meta") or {}).get("versionId", ""))
                updated = apply_step(task, status, desired, careplan_id=careplan_id,
                                     now=clock().isoformat(timespec="seconds"), ctx=ctx)
                task = client.update_versioned("Task", task_id, updated, version)
                if task.get("status") != status:  # believed only when the stored Task shows the step
                    report.problems.append(f"Task/{task_id}: the server's answer does not show it {status}")
                    return
                report.updated += 1
        except FhirHttpError as exc:
            if exc.status not in VERSION_CONFLICT:
                report.problems.append(f"Task/{task_id}: HTTP {exc.status} moving it to {desired.status}")
                return
            report.conflicts += 1
            log.info("clinic referral Task changed in the EHR meanwhile (HTTP %s): re-read and re-applied",
                     exc.status, extra={"event": "task-concurrent-edit"})
            task = client.read("Task", task_id)
        else:
            return
    report.problems.append(f"Task/{task_id}: still changing in the EHR after {MAX_TRIES} tries")
