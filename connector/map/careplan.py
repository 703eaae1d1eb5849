"""An enrollment as a US Core CarePlan (with its CareTeam) (fhir-modeling.md §2, §5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from connector.identifiers import (
    KIND_CAREPLAN,
    KIND_CARETEAM,
    KIND_CONTACT_REQUEST,
    KIND_GOAL,
    KIND_REFERRAL,
)
from connector.model import Enrollment, EnrollmentStatus, Supporter

from . import codes
from ._util import compact, iso_date, resource
from .context import MappingContext
from .narrative import careplan_narrative, with_narrative
from .people import TeamMember, map_careteam

CAREPLAN_TITLE = "Diabetes peer support plan"
_STATUS_TEXT = {
    EnrollmentStatus.ACTIVE: "active",
    EnrollmentStatus.ON_HOLD: "on hold",
    EnrollmentStatus.COMPLETED: "completed",
    EnrollmentStatus.WITHDRAWN: "withdrawn early",
    EnrollmentStatus.DECLINED: "declined to join",
    EnrollmentStatus.NOT_REACHED: "could not be reached",
}


def careplan_ref(e_or_id: Enrollment | str, ctx: MappingContext) -> dict[str, Any]:
    """Conditional reference to the CarePlan of an enrollment."""
    enrollment_id = e_or_id if isinstance(e_or_id, str) else e_or_id.enrollment_id
    return ctx.ref("CarePlan", KIND_CAREPLAN, enrollment_id)


def _clinic_referral(e: Enrollment, ctx: MappingContext) -> list[dict[str, Any]]:
    """The clinic's ServiceRequest this enrollment answers (read from the referral Task at sync time). In
    supportingInfo: R4 limits CarePlan.basedOn to CarePlan (HAPI refuses a ServiceRequest there, HAPI-0931)."""
    request_id = ctx.clinic_referral_requests.get(e.clinic_referral) if e.clinic_referral else None
    return [{"reference": f"ServiceRequest/{request_id}"}] if request_id else []


def map_enrollment(
    e: Enrollment,
    *,
    goal_ids: Sequence[str],
    planned_contact_ids: Sequence[str],
    referral_ids: Sequence[str],
    ctx: MappingContext,
    supporter: Supporter | None = None,
    team: Sequence[TeamMember] = (),
) -> list[dict[str, Any]]:
    """An enrollment as [CarePlan, CareTeam].

    ``goal_ids``, ``planned_contact_ids`` and ``referral_ids`` are the source ids of the enrollment's goals,
    planned contacts and referrals (list only those that are sent). ``supporter`` (optional) gives the
    CareTeam member's role its NUCC code and title; without it the role is text only. ``team`` are the other
    supporters who worked with the participant (:class:`~connector.map.people.TeamMember`).
    """
    status = codes.ENTERED_IN_ERROR if e.void else codes.CAREPLAN_STATUS[e.status]
    activities = [{"reference": ctx.ref("CommunicationRequest", KIND_CONTACT_REQUEST, p)} for p in planned_contact_ids]
    activities += [{"reference": ctx.ref("ServiceRequest", KIND_REFERRAL, r)} for r in referral_ids]
    careplan = resource(
        "CarePlan",
        ctx,
        identifier=[ctx.ident(KIND_CAREPLAN, e.enrollment_id)],
        status=status,
        intent="plan",
        category=[
            {"coding": [dict(codes.CAREPLAN_ASSESS_PLAN)]},
            {"coding": [dict(codes.SNOMED_DIABETES_SM_PLAN)]},
            codes.local_concept(ctx, codes.CS_CAREPLAN_KIND, "peer-support-plan"),
        ],
        title=CAREPLAN_TITLE,
        subject=ctx.patient_ref(e),
        period=compact({"start": iso_date(e.start_date), "end": iso_date(e.end_date) if e.end_date else None}),
        author=ctx.organization_ref(),
        careTeam=[ctx.ref("CareTeam", KIND_CARETEAM, e.enrollment_id)],
        goal=[ctx.ref("Goal", KIND_GOAL, g) for g in goal_ids],
        activity=activities,
        supportingInfo=_clinic_referral(e, ctx),
    )
    status_text = "entered in error" if e.void else _STATUS_TEXT[e.status]
    careplan = with_narrative(careplan, careplan_narrative(
        careplan, enrollment_id=e.enrollment_id, status_text=status_text, program_name=ctx.program_name,
        goal_ids=goal_ids, planned_contacts=len(planned_contact_ids), referrals=len(referral_ids)))
    return [careplan, map_careteam(e, ctx, supporter, team)]
