"""A peer contact as a Communication (fhir-modeling.md §3.2). There is no US Core Communication profile."""

from __future__ import annotations

from typing import Any

from connector.identifiers import (
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
    SupportType,
)

from . import codes
from ._util import resource
from .careplan import careplan_ref
from .context import MappingContext

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


def map_contact(c: Contact, e: Enrollment, ctx: MappingContext) -> dict[str, Any]:
    """One contact with one participant: status, mode, support delivered, links to goals and plan, notes."""
    if c.void:
        status = codes.ENTERED_IN_ERROR
    elif c.outcome is ContactOutcome.COMPLETED:
        status = "completed"
    else:
        status = "not-done"
    sent = ctx.datetime_str(c.occurred_at)
    plan = careplan_ref(e, ctx)
    based_on = [plan]
    if c.planned_contact_id:
        based_on.append(ctx.ref("CommunicationRequest", KIND_CONTACT_REQUEST, c.planned_contact_id))
    sender = ctx.ref("PractitionerRole", KIND_ROLE, c.supporter_id)
    return resource(
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
        # for a contact that did not happen, `sent` is the time of the attempt and nothing was received
        sent=sent,
        received=sent if status == "completed" and c.mode in codes.SYNCHRONOUS_MODES else None,
        recipient=[ctx.patient_ref(e)],
        sender=sender,
        note=[{"authorReference": ctx.ref("Practitioner", KIND_STAFF, c.supporter_id), "time": sent, "text": c.notes}]
        if c.notes
        else [],
    )


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
