"""What landed: the server's own counts of this program's resources (by business identifier system)."""

from __future__ import annotations

from connector.identifiers import (
    KIND_CANCELLED_CONTACT,
    KIND_CAREPLAN,
    KIND_CARETEAM,
    KIND_CBO,
    KIND_CONTACT,
    KIND_CONTACT_PROCEDURE,
    KIND_CONTACT_REQUEST,
    KIND_DEVICE,
    KIND_GOAL,
    KIND_NOTE,
    KIND_ORGANIZATION,
    KIND_REFERRAL,
    KIND_REFERRAL_TASK,
    KIND_ROLE,
    KIND_STAFF,
)
from connector.map import MappingContext
from connector.server.client import FhirClient

# (resource type, identifier kind, status search parameter for entered-in-error, if any)
PROGRAM_RESOURCES: list[tuple[str, str, str | None]] = [
    ("Organization", KIND_ORGANIZATION, None),
    ("Organization", KIND_CBO, None),
    ("Device", KIND_DEVICE, None),
    ("Practitioner", KIND_STAFF, None),
    ("PractitionerRole", KIND_ROLE, None),
    ("CareTeam", KIND_CARETEAM, "status"),
    ("CarePlan", KIND_CAREPLAN, "status"),
    ("Goal", KIND_GOAL, "lifecycle-status"),
    ("Communication", KIND_CONTACT, "status"),
    ("Procedure", KIND_CONTACT_PROCEDURE, "status"),  # [server] contact_procedures = "also" or "instead"
    ("CommunicationRequest", KIND_CONTACT_REQUEST, "status"),
    ("CommunicationRequest", KIND_CANCELLED_CONTACT, "status"),  # the planned time of a cancelled contact
    ("ServiceRequest", KIND_REFERRAL, "status"),
    ("Task", KIND_REFERRAL_TASK, "status"),
    ("DocumentReference", KIND_NOTE, "status"),
]


def _count(client: FhirClient, query: str) -> int:
    return int(client.request("GET", query).json().get("total", 0))


def landed_counts(client: FhirClient, ctx: MappingContext) -> list[dict[str, object]]:
    """Per resource type and identifier kind: how many the server holds, and how many are entered-in-error."""
    rows: list[dict[str, object]] = []
    for resource_type, kind, status_param in PROGRAM_RESOURCES:
        system = ctx.system(kind)
        base = f"{resource_type}?identifier={system}%7C&_summary=count"
        total = _count(client, base)
        voided = _count(client, f"{base}&{status_param}=entered-in-error") if status_param else 0
        rows.append({"resource_type": resource_type, "kind": kind, "total": total, "entered_in_error": voided})
    rows.append({"resource_type": "Provenance", "kind": "change-set",
                 "total": _count(client, f"Provenance?_source={ctx.meta_source}&_summary=count"),
                 "entered_in_error": 0})
    return rows
