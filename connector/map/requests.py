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
from connector.model import Enrollment, NeedCategory, PlannedContact, Referral, ReferralStatus

from . import codes
from ._util import iso_date, markdown_text, resource
from .careplan import careplan_ref
from .communication import medium
from .context import MappingContext
from .narrative import (
    communication_request_narrative,
    organization_narrative,
    service_request_narrative,
    task_narrative,
    with_narrative,
)


def map_planned_contact(p: PlannedContact, e: Enrollment, ctx: MappingContext) -> dict[str, Any]:
    """The next planned contact as a CommunicationRequest (listed in CarePlan.activity)."""
    status = codes.ENTERED_IN_ERROR if p.void else codes.COMMUNICATION_REQUEST_STATUS[p.status]
    supporter = supporter_or_program(p.supporter_id, ctx)
    request = resource(
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
    return with_narrative(request, communication_request_narrative(request, timezone=ctx.timezone))


def supporter_or_program(supporter_id: str | None, ctx: MappingContext) -> dict[str, Any]:
    """Who asked for something: the supporter the record names, else the program Organization (never a default
    supporter: the enrollment's supporter did not necessarily make the request)."""
    if supporter_id:
        return ctx.ref("PractitionerRole", KIND_ROLE, supporter_id)
    return ctx.organization_ref()


def cbo_ref(r: Referral, ctx: MappingContext) -> dict[str, Any]:
    """The community resource: a conditional reference when the program has a directory id, else a display."""
    if r.resource_id:
        return ctx.ref("Organization", KIND_CBO, r.resource_id, r.resource_name)
    return {"display": r.resource_name}


def map_cbo(r: Referral, ctx: MappingContext) -> dict[str, Any] | None:
    """The community resource as an Organization, when the program identifies it (``resource_id``)."""
    if not r.resource_id:
        return None
    organization = resource(
        "Organization",
        ctx,
        identifier=[ctx.ident(KIND_CBO, r.resource_id)],
        active=True,
        type=[{"coding": [dict(codes.ORG_TYPE_COMMUNITY_GROUP)]}],
        name=r.resource_name,
    )
    return with_narrative(organization, organization_narrative(organization, community_resource=True))


def map_referral(r: Referral, e: Enrollment, ctx: MappingContext) -> list[dict[str, Any]]:
    """A referral to a community resource as [ServiceRequest, Task] (US Core ServiceRequest, SDOHCC Task)."""
    requester = supporter_or_program(r.supporter_id, ctx)
    performer = cbo_ref(r, ctx)
    need_text = r.original_text.get("need") if r.need is NeedCategory.OTHER else None
    service = {"coding": [codes.referral_service_code(r.need, ctx, r.resource_id)],
               "text": f"Referral to {r.resource_name}"}
    notes = [{"text": markdown_text(r.outcome_notes)}] if r.outcome_notes else []
    service_request = resource(
        "ServiceRequest",
        ctx,
        identifier=[ctx.ident(KIND_REFERRAL, r.referral_id)],
        basedOn=[careplan_ref(e, ctx)],
        status=codes.ENTERED_IN_ERROR if r.void else codes.SERVICE_REQUEST_STATUS[r.status],
        intent="order",
        category=_categories(r, need_text, ctx),
        code=service,
        subject=ctx.patient_ref(e),
        authoredOn=iso_date(r.referred_on),
        requester=requester,
        performer=[performer],
        reasonCode=[codes.local_concept(ctx, codes.CS_REFERRAL_NEED, r.need.value, need_text)],
    )
    if r.void:
        task_status, reason = codes.ENTERED_IN_ERROR, None
    else:
        task_status = codes.TASK_STATUS[r.status]
        reason = codes.task_status_reason(r.status, ctx)
        if task_status == "requested" and ctx.referral_tasks == "draft":
            task_status = "draft"  # recorded, not yet for the organization to act on ([server] referral_tasks)
    task = resource(
        "Task",
        ctx,
        identifier=[ctx.ident(KIND_REFERRAL_TASK, r.referral_id)],
        status=task_status,
        statusReason=reason,
        businessStatus={"text": codes.TASK_BUSINESS_STATUS[r.status]},
        intent="order",
        code={"coding": [dict(codes.TASK_FULFILL)]},
        focus=ctx.ref("ServiceRequest", KIND_REFERRAL, r.referral_id),
        # `for` is a Python keyword, hence the dict
        **{"for": ctx.patient_ref(e)},
        authoredOn=iso_date(r.referred_on),
        lastModified=_last_modified(r),
        requester=requester,
        owner=performer,
        note=notes,
        output=_output(r, service),
    )
    server_task = ctx.organization_tasks.get(identifier_value(r.referral_id))
    if server_task is not None and not r.void:
        task = keep_organization_fields(task, server_task)  # the organization's status is never rolled back
    return [with_narrative(service_request, service_request_narrative(service_request, r)),
            with_narrative(task, task_narrative(task, r))]


def _last_modified(r: Referral) -> str | None:
    """When the referral reached its status: recorded by the source, or the referral date while it is only made;
    otherwise unknown and left out (never invented)."""
    if r.status_date is not None:
        return iso_date(r.status_date)
    return iso_date(r.referred_on) if r.status is ReferralStatus.MADE else None


def _output(r: Referral, service: dict[str, Any]) -> list[dict[str, Any]]:
    """SDOHCC PerformedActivityCode: a completed referral's service, as the activity that resulted from it.

    The code is the ServiceRequest's, which is only ever as specific as the program knows to be true (the
    resource's own code, a need-level code true for every referral of the need, else "Social service
    procedure"); the text says the service was received from the resource, not that a referral was made."""
    if r.void or r.status is not ReferralStatus.COMPLETED:
        return []
    return [{"type": {"coding": [dict(codes.SDOHCC_RESULTING_ACTIVITY)]},
             "valueCodeableConcept": {"coding": [dict(c) for c in service["coding"]],
                                      "text": f"Service received from {r.resource_name}"}}]


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


def _categories(r: Referral, need_text: str | None, ctx: MappingContext) -> list[dict[str, Any]]:
    local = codes.local_concept(ctx, codes.CS_REFERRAL_NEED, r.need.value, need_text)
    if r.need is NeedCategory.PHYSICAL_ACTIVITY:
        # the Physical Activity IG's ServiceRequest category; not a social determinant
        return [{"coding": [dict(codes.PA_PHYSICAL_ACTIVITY)]}, local]
    return [
        {"coding": [dict(codes.US_CORE_SDOH)]},
        # US Core ServiceRequest category value set: a social service procedure (SDOHCC's examples do the same)
        {"coding": [dict(codes.SNOMED_SOCIAL_SERVICE)]},
        {"coding": [dict(codes.NEED_SDOHCC[r.need])]},
        local,
    ]
