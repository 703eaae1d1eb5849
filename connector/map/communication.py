"""A peer contact as a Communication (fhir-modeling.md §3.2). There is no US Core Communication profile."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from connector.identifiers import (
    KIND_CANCELLED_CONTACT,
    KIND_CONTACT,
    KIND_CONTACT_REQUEST,
    KIND_GOAL,
    KIND_ROLE,
    KIND_STAFF,
    identifier_value,
)
from connector.model import (
    Contact,
    ContactMode,
    ContactOutcome,
    Enrollment,
    Goal,
    Supporter,
    SupportType,
)

from . import codes
from ._util import compact, markdown_text, resource
from .careplan import careplan_ref
from .context import MappingContext
from .narrative import communication_narrative, communication_request_narrative, with_narrative

_NOT_DONE_REASON = {
    ContactOutcome.NOT_REACHED: {
        "coding": [dict(codes.NOT_DONE_RECIPIENT_UNAVAILABLE)],
        "text": "Participant not reached",
    },
    ContactOutcome.CANCELLED: {"text": "Contact cancelled"},
}


def medium(mode: ContactMode, ctx: MappingContext) -> dict[str, Any]:
    """The contact mode as one CodeableConcept: v3-ParticipationMode plus our code where v3 has none."""
    v3, local, text = codes.CONTACT_MODE[mode]
    coding = [dict(c) for c in v3]
    if local:
        coding.append(codes.local_coding(ctx, codes.CS_CONTACT_MODE, local))
    return {"coding": coding, "text": text}


def map_contact(c: Contact, e: Enrollment, ctx: MappingContext, *, supporter: Supporter | None = None,
                goals: Sequence[Goal] = ()) -> dict[str, Any]:
    """One contact with one participant: status, mode, support delivered, links to goals and plan, notes.

    ``supporter`` (the contact's) and ``goals`` (those it discussed) give the narrative the supporter's name and
    title and the goals' own words; without them it says "Peer supporter" and lists no goals."""
    if c.void:
        status = codes.ENTERED_IN_ERROR
    elif c.outcome is ContactOutcome.COMPLETED:
        status = "completed"
    else:
        status = "not-done"
    # a cancelled contact was never attempted: no `sent`; its planned time is on the revoked request
    sent = None if c.outcome is ContactOutcome.CANCELLED else ctx.datetime_str(c.occurred_at)
    plan = careplan_ref(e, ctx)
    based_on = [plan]
    if c.planned_contact_id:
        based_on.append(ctx.ref("CommunicationRequest", KIND_CONTACT_REQUEST, c.planned_contact_id))
    elif c.outcome is ContactOutcome.CANCELLED:
        based_on.append(ctx.ref("CommunicationRequest", KIND_CANCELLED_CONTACT, c.contact_id))
    sender = ctx.ref("PractitionerRole", KIND_ROLE, c.supporter_id)
    communication = resource(
        "Communication",
        ctx,
        extension=_extensions(c, ctx),
        identifier=[ctx.ident(KIND_CONTACT, c.contact_id)],
        basedOn=based_on,
        status=status,
        statusReason=None if c.void else _NOT_DONE_REASON.get(c.outcome),
        category=_categories(c, ctx),
        medium=[medium(c.mode, ctx)],
        subject=ctx.patient_ref(e),
        topic={"coding": [dict(codes.TOPIC_PROGRESS_UPDATE)], "text": "Peer support contact"},
        about=[ctx.ref("Goal", KIND_GOAL, g) for g in c.goal_ids] + [plan],
        # for a participant not reached, `sent` is the time of the attempt and nothing was received
        sent=sent,
        received=sent if status == "completed" and c.mode in codes.SYNCHRONOUS_MODES else None,
        recipient=[ctx.patient_ref(e)],
        sender=sender,
        note=[compact({"authorReference": ctx.ref("Practitioner", KIND_STAFF, c.supporter_id), "time": sent,
                       "text": markdown_text(c.notes)})]
        if c.notes
        else [],
    )
    return with_narrative(communication, communication_narrative(communication, supporter=supporter, goals=goals,
                                                                 timezone=ctx.timezone))


def map_cancelled_contact_request(c: Contact, e: Enrollment, ctx: MappingContext) -> dict[str, Any] | None:
    """A cancelled contact that no planned contact stands for: a revoked CommunicationRequest carrying the time it
    was planned for (its Communication has no `sent`). None for any other contact."""
    if c.outcome is not ContactOutcome.CANCELLED or c.planned_contact_id:
        return None
    supporter = ctx.ref("PractitionerRole", KIND_ROLE, c.supporter_id)
    request = resource(
        "CommunicationRequest",
        ctx,
        identifier=[ctx.ident(KIND_CANCELLED_CONTACT, c.contact_id)],
        basedOn=[careplan_ref(e, ctx)],
        status=codes.ENTERED_IN_ERROR if c.void else "revoked",
        medium=[medium(c.mode, ctx)],
        subject=ctx.patient_ref(e),
        occurrenceDateTime=ctx.datetime_str(c.occurred_at),
        requester=supporter,
        recipient=[ctx.patient_ref(e)],
        sender=supporter,
    )
    return with_narrative(request, communication_request_narrative(request, timezone=ctx.timezone))


def _categories(c: Contact, ctx: MappingContext) -> list[dict[str, Any]]:
    out = []
    for support in dict.fromkeys(c.support_types):
        text = c.original_text.get("support_types") if support is SupportType.OTHER else None
        concept = codes.local_concept(ctx, codes.CS_SUPPORT_TYPE, support.value, text)
        if support in codes.SUPPORT_TYPE_STANDARD:  # the same concept in SNOMED CT, for EHRs that ignore ours
            concept["coding"].append(dict(codes.SUPPORT_TYPE_STANDARD[support]))
        out.append(concept)
    for element in dict.fromkeys(c.essential_elements):
        out.append(codes.local_concept(ctx, codes.CS_ESSENTIAL_ELEMENT, element.value))
    return out


def _extensions(c: Contact, ctx: MappingContext) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if c.duration_minutes is not None:
        out.append(
            {
                "url": ctx.extension_url(codes.EXT_CONTACT_DURATION),
                "valueDuration": {"value": c.duration_minutes, "unit": "min", "system": codes.UCUM, "code": "min"},
            }
        )
    if c.setting is not None:
        text = c.original_text.get("setting") if c.setting.value == "other" else None
        out.append(
            {
                "url": ctx.extension_url(codes.EXT_CONTACT_SETTING),
                "valueCodeableConcept": codes.local_concept(ctx, codes.CS_CONTACT_SETTING, c.setting.value, text),
            }
        )
    if c.group_session_id:
        out.append(
            {
                "url": ctx.extension_url(codes.EXT_GROUP_SESSION),
                "valueIdentifier": {
                    "system": ctx.system(codes.KIND_GROUP_SESSION),
                    "value": identifier_value(c.group_session_id),
                },
            }
        )
    return out
