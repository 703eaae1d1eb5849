"""Requests: a planned contact (CommunicationRequest) and a community referral (ServiceRequest + Task,
the SDOH Clinical Care pattern) (fhir-modeling.md §3.4, §6)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connector.identifiers import (
    KIND_CBO,
    KIND_CONTACT_REQUEST,
    KIND_REFERRAL,
    KIND_REFERRAL_TASK,
    KIND_ROLE,
    identifier_value,
)
from connector.model import Enrollment, NeedCategory, PlannedContact, Referral

from . import codes
from ._util import iso_date, resource
from .careplan import careplan_ref
from .communication import medium
from .context import MappingContext


def map_planned_contact(p: PlannedContact, e: Enrollment, ctx: MappingContext) -> dict[str, Any]:
    """The next planned contact as a CommunicationRequest (listed in CarePlan.activity)."""
    status = codes.ENTERED_IN_ERROR if p.void else codes.COMMUNICATION_REQUEST_STATUS[p.status]
    supporter = ctx.ref("PractitionerRole", KIND_ROLE, p.supporter_id or e.supporter_id)
    return resource(
        "CommunicationRequest",
        ctx,
        identifier=[ctx.ident(KIND_CONTACT_REQUEST, p.planned_contact_id)],
        basedOn=[careplan_ref(e, ctx)],
        status=status,
        medium=[medium(p.mode, ctx)],
        subject=ctx.patient_ref(e),
        occurrenceDateTime=ctx.datetime_str(p.due_at),
        requester=supporter,
        recipient=[ctx.patient_ref(e)],
        sender=supporter,
    )


def cbo_ref(r: Referral, ctx: MappingContext) -> dict[str, Any]:
    """The community resource: a conditional reference when the program has a directory id, else a display."""
    if r.resource_id:
        return ctx.ref("Organization", KIND_CBO, r.resource_id, r.resource_name)
    return {"display": r.resource_name}


def map_cbo(r: Referral, ctx: MappingContext) -> dict[str, Any] | None:
    """The community resource as an Organization, when the program identifies it (``resource_id``)."""
    if not r.resource_id:
        return None
    return resource(
        "Organization",
        ctx,
        identifier=[ctx.ident(KIND_CBO, r.resource_id)],
        active=True,
        type=[{"coding": [dict(codes.ORG_TYPE_COMMUNITY_GROUP)]}],
        name=r.resource_name,
    )


def map_referral(r: Referral, e: Enrollment, ctx: MappingContext) -> list[dict[str, Any]]:
    """A referral to a community resource as [ServiceRequest, Task]."""
    requester = ctx.ref("PractitionerRole", KIND_ROLE, r.supporter_id or e.supporter_id)
    performer = cbo_ref(r, ctx)
    service_request = resource(
        "ServiceRequest",
        ctx,
        identifier=[ctx.ident(KIND_REFERRAL, r.referral_id)],
        basedOn=[careplan_ref(e, ctx)],
        status=codes.ENTERED_IN_ERROR if r.void else codes.SERVICE_REQUEST_STATUS[r.status],
        intent="order",
        category=_categories(r, ctx),
        code={"coding": [dict(codes.NEED_SERVICE_CODE[r.need])], "text": f"Referral to {r.resource_name}"},
        subject=ctx.patient_ref(e),
        authoredOn=iso_date(r.referred_on),
        requester=requester,
        performer=[performer],
    )
    if r.void:
        task_status, reason = codes.ENTERED_IN_ERROR, None
    else:
        task_status = codes.TASK_STATUS[r.status]
        reason = codes.TASK_STATUS_REASON.get(r.status)
    task = resource(
        "Task",
        ctx,
        identifier=[ctx.ident(KIND_REFERRAL_TASK, r.referral_id)],
        status=task_status,
        statusReason={"text": reason} if reason else None,
        intent="order",
        code={"coding": [dict(codes.TASK_FULFILL)]},
        focus=ctx.ref("ServiceRequest", KIND_REFERRAL, r.referral_id),
        # `for` is a Python keyword, hence the dict
        **{"for": ctx.patient_ref(e)},
        authoredOn=iso_date(r.referred_on),
        requester=requester,
        owner=performer,
        note=[{"text": r.outcome_notes}] if r.outcome_notes else [],
    )
    server_task = ctx.organization_tasks.get(identifier_value(r.referral_id))
    if server_task is not None and not r.void:
        task = keep_organization_fields(task, server_task)  # the organization's status is never rolled back
    return [service_request, task]


# The elements of a referral Task that belong to the performing organization once it has changed the Task.
ORGANIZATION_ELEMENTS = ("status", "statusReason", "businessStatus", "output", "lastModified")


def keep_organization_fields(mapped_task: dict[str, Any], server_task: Mapping[str, Any]) -> dict[str, Any]:
    """The Task peersync is about to send, with the organization's elements kept from the server's copy
    (docs/care-coordination.md: a program export never rolls back the organization's status)."""
    out = dict(mapped_task)
    for element in ORGANIZATION_ELEMENTS:
        if element in server_task:
            out[element] = server_task[element]
        else:
            out.pop(element, None)
    return out


def _categories(r: Referral, ctx: MappingContext) -> list[dict[str, Any]]:
    need_text = r.original_text.get("need") if r.need is NeedCategory.OTHER else None
    local = codes.local_concept(ctx, codes.CS_REFERRAL_NEED, r.need.value, need_text)
    if r.need is NeedCategory.PHYSICAL_ACTIVITY:
        # the Physical Activity IG's ServiceRequest category; not a social determinant
        return [{"coding": [dict(codes.PA_PHYSICAL_ACTIVITY)]}, local]
    return [
        {"coding": [dict(codes.US_CORE_SDOH)]},
        {"coding": [dict(codes.NEED_SDOHCC[r.need])]},
        local,
    ]
