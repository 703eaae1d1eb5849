"""An enrollment as a US Core CarePlan (with its CareTeam) (fhir-modeling.md §2, §5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from connector.identifiers import (
    KIND_CAREPLAN,
    KIND_CARETEAM,
    KIND_CONTACT,
    KIND_CONTACT_PROCEDURE,
    KIND_CONTACT_REQUEST,
    KIND_GOAL,
    KIND_REFERRAL,
    KIND_ROLE,
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


# MCC eCare Plan's R5 backport of CarePlan.custodian (the party responsible for the plan), used instead of author
MCC_CUSTODIAN = "http://hl7.org/fhir/us/mcc/StructureDefinition/custodian"


def contact_outcome_ref(contact_id: str, ctx: MappingContext) -> dict[str, Any]:
    """The resource a performed contact is written as, for ``activity.outcomeReference``: its Procedure when the
    contacts are written as Procedures instead of Communications, else its Communication."""
    if ctx.contact_procedures == "instead":
        return ctx.ref("Procedure", KIND_CONTACT_PROCEDURE, contact_id)
    return ctx.ref("Communication", KIND_CONTACT, contact_id)


def map_enrollment(
    e: Enrollment,
    *,
    goal_ids: Sequence[str],
    planned_contact_ids: Sequence[str],
    referral_ids: Sequence[str],
    ctx: MappingContext,
    supporter: Supporter | None = None,
    team: Sequence[TeamMember] = (),
    performed_contacts: Sequence[tuple[str, str | None]] = (),
    contributor_ids: Sequence[str] = (),
    condition_refs: Sequence[str] = (),
    goal_words: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """An enrollment as [CarePlan, CareTeam], shaped as the MCC eCare Plan guide asks.

    ``goal_ids``, ``planned_contact_ids`` and ``referral_ids`` are the source ids of the enrollment's goals,
    planned contacts and referrals (list only those that are sent). ``supporter`` (optional) gives the
    CareTeam member's role its NUCC code and title; without it the role is text only. ``team`` are the other
    supporters who worked with the participant (:class:`~connector.map.people.TeamMember`).
    ``performed_contacts`` are (contact id, planned contact id or None) of the contacts that took place: each is an
    ``activity.outcomeReference``, under its planned contact's activity or under one activity for the contacts not
    planned ahead. ``contributor_ids`` are the supporters who contributed records (besides the enrollment's).
    ``condition_refs`` are literal references (``Condition/123``) to the EHR's own Conditions the enrollment names,
    found at sync time (``CarePlan.addresses``); the mapper never invents or creates one.
    """
    status = codes.ENTERED_IN_ERROR if e.void else codes.CAREPLAN_STATUS[e.status]
    planned = set(planned_contact_ids)
    outcomes: dict[str | None, list[dict[str, Any]]] = {}
    for contact_id, planned_id in performed_contacts:
        key = planned_id if planned_id in planned else None
        outcomes.setdefault(key, []).append(contact_outcome_ref(contact_id, ctx))
    activities: list[dict[str, Any]] = []
    for p in planned_contact_ids:
        activity: dict[str, Any] = {"reference": ctx.ref("CommunicationRequest", KIND_CONTACT_REQUEST, p)}
        if outcomes.get(p):
            activity["outcomeReference"] = outcomes[p]
        activities.append(activity)
    activities += [{"reference": ctx.ref("ServiceRequest", KIND_REFERRAL, r)} for r in referral_ids]
    if outcomes.get(None):
        # contacts not planned ahead: one activity that holds only their outcomes (activities here are references
        # to requests, never `detail`; cpl-3 allows an activity with neither)
        activities.append({"outcomeReference": outcomes[None]})
    contributors = [ctx.organization_ref()] + [
        ctx.ref("PractitionerRole", KIND_ROLE, s) for s in dict.fromkeys([e.supporter_id, *contributor_ids])
    ]
    careplan = resource(
        "CarePlan",
        ctx,
        extension=[{"url": MCC_CUSTODIAN, "valueReference": ctx.organization_ref()}],
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
        # MCC: the custodian extension names the responsible party; author is discouraged (removed in R5)
        contributor=contributors,
        careTeam=[ctx.ref("CareTeam", KIND_CARETEAM, e.enrollment_id)],
        addresses=[{"reference": ref} for ref in condition_refs],
        goal=[ctx.ref("Goal", KIND_GOAL, g) for g in goal_ids],
        activity=activities,
        supportingInfo=_clinic_referral(e, ctx),
    )
    status_text = "entered in error" if e.void else _STATUS_TEXT[e.status]
    careplan = with_narrative(careplan, careplan_narrative(
        careplan, status_text=status_text, program_name=ctx.program_name,
        goals=len(goal_ids), goal_words=[w for g in goal_ids if (w := (goal_words or {}).get(g))],
        planned_contacts=len(planned_contact_ids), referrals=len(referral_ids)))
    return [careplan, map_careteam(e, ctx, supporter, team)]
