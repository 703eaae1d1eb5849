"""A peer contact as a US Core Procedure, beside or instead of its Communication (``[server] contact_procedures``).

USCDI carries SDOH and care-coordination interventions as US Core Procedure, and many EHRs show Procedures where
they ignore Communications. The Procedure says what took place (or did not), when, by whom, under which plan and
toward which goals; the Communication stays the fuller record of the exchange (mode, recipient, topic).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from connector.identifiers import KIND_CONTACT_PROCEDURE, KIND_GOAL, KIND_ROLE, KIND_STAFF
from connector.model import (
    Contact,
    ContactMode,
    ContactOutcome,
    ContactSetting,
    Enrollment,
    Goal,
    Supporter,
    SupportType,
)

from . import codes
from ._util import markdown_text
from .careplan import careplan_ref
from .context import MappingContext
from .narrative import procedure_narrative, with_narrative

_NOT_DONE_REASON = {
    ContactOutcome.NOT_REACHED: "Participant not reached",
    ContactOutcome.CANCELLED: "Contact cancelled",
}


def procedure_status(c: Contact) -> str:
    """event-status: completed when the contact took place, not-done when it was attempted or cancelled."""
    if c.void:
        return codes.ENTERED_IN_ERROR
    return "completed" if c.outcome is ContactOutcome.COMPLETED else "not-done"


def procedure_category(c: Contact) -> dict[str, Any] | None:
    """R4 Procedure.category (0..1) from FHIR's procedure-category codes, only where one fits the support given:
    linkage to community resources is a social service procedure, education or skills training is education.
    Other support (emotional, follow-up, outreach...) has no verified standard code and gets no category."""
    support = set(c.support_types)
    if SupportType.COMMUNITY_LINKAGE in support:
        return {"coding": [dict(codes.SNOMED_SOCIAL_SERVICE)]}
    if support & {SupportType.EDUCATION, SupportType.SKILLS_TRAINING}:
        return {"coding": [dict(codes.SNOMED_EDUCATION)]}
    return None


def procedure_code(c: Contact, ctx: MappingContext) -> dict[str, Any]:
    """Our peer-support-contact code, with a broader SNOMED CT encounter code beside it where one is true of the
    contact's mode and place (docs/field-coverage.md): a telephone contact is a telephone encounter, a face-to-face
    contact at the participant's home a home visit. Nothing else is inferred."""
    concept = codes.local_concept(ctx, codes.CS_PEER_SUPPORT_ACTIVITY, "peer-support-contact")
    if c.mode is ContactMode.TELEPHONE:
        concept["coding"].append(dict(codes.SNOMED_TELEPHONE_ENCOUNTER))
    elif c.mode is ContactMode.FACE_TO_FACE and c.setting is ContactSetting.HOME:
        concept["coding"].append(dict(codes.SNOMED_HOME_VISIT))
    return concept


def performed(c: Contact, ctx: MappingContext) -> dict[str, Any]:
    """``performedPeriod`` (start + duration) when the duration is known, else ``performedDateTime``; nothing for
    a contact that did not take place (US Core us-core-7 asks for it only when completed or in progress)."""
    if c.void or c.outcome is not ContactOutcome.COMPLETED:
        return {}
    start = ctx.datetime_str(c.occurred_at)
    if c.duration_minutes is None:
        return {"performedDateTime": start}
    end = ctx.datetime_str(c.occurred_at + timedelta(minutes=c.duration_minutes))
    return {"performedPeriod": {"start": start, "end": end}}


def map_contact_procedure(c: Contact, e: Enrollment, ctx: MappingContext, *, supporter: Supporter | None = None,
                          goals: Sequence[Goal] = ()) -> dict[str, Any]:
    """One contact as a US Core 6.1.0 Procedure (identifier under ``{sid}/contact-procedure``); ``supporter`` and
    ``goals`` (those it discussed) give its narrative names and words, as for the Communication."""
    status = procedure_status(c)
    reason = None if c.void else _NOT_DONE_REASON.get(c.outcome)
    # R4 Procedure.reasonReference cannot point at a Goal: the core pertainsToGoal extension links the goals
    goal_links = [{"url": codes.PERTAINS_TO_GOAL, "valueReference": ctx.ref("Goal", KIND_GOAL, g)}
                  for g in dict.fromkeys(c.goal_ids)]
    out: dict[str, Any] = {"resourceType": "Procedure", "meta": ctx.meta()}
    if goal_links:
        out["extension"] = goal_links
    out["identifier"] = [ctx.ident(KIND_CONTACT_PROCEDURE, c.contact_id)]
    out["basedOn"] = [careplan_ref(e, ctx)]
    out["status"] = status
    if reason:
        out["statusReason"] = {"text": reason}
    category = procedure_category(c)
    if category:
        out["category"] = category
    out["code"] = procedure_code(c, ctx)
    out["subject"] = ctx.patient_ref(e)
    out.update(performed(c, ctx))
    out["performer"] = [{"actor": ctx.ref("PractitionerRole", KIND_ROLE, c.supporter_id),
                         "onBehalfOf": ctx.organization_ref()}]
    if c.notes:
        # a cancelled contact never took place: its note has no time (as on its Communication)
        note: dict[str, Any] = {"authorReference": ctx.ref("Practitioner", KIND_STAFF, c.supporter_id)}
        if c.outcome is not ContactOutcome.CANCELLED:
            note["time"] = ctx.datetime_str(c.occurred_at)
        note["text"] = markdown_text(c.notes)
        out["note"] = [note]
    return with_narrative(out, procedure_narrative(out, supporter=supporter, goals=goals, timezone=ctx.timezone))
