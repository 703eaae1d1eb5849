"""The program, its peer supporters and a participant's care team: Organization, Device, Practitioner,
PractitionerRole and CareTeam (fhir-modeling.md §4, §5, §7)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from connector.identifiers import (
    KIND_CARETEAM,
    KIND_DEVICE,
    KIND_ORGANIZATION,
    KIND_ROLE,
    KIND_STAFF,
)
from connector.model import Enrollment, Supporter, SupporterTitle

from . import codes
from ._util import compact, iso_date, resource
from .context import DEVICE_IDENTIFIER_VALUE, MappingContext
from .narrative import (
    careteam_narrative,
    device_narrative,
    organization_narrative,
    practitioner_narrative,
    practitioner_role_narrative,
    with_narrative,
)

CARE_TEAM_NAME = "Diabetes peer support team"


def map_program(ctx: MappingContext) -> list[dict[str, Any]]:
    """The program's Organization and the peersync Device that transmits on its behalf (only the Device when the
    Organization is the EHR's own, ``ctx.directory``)."""
    organization = resource(
        "Organization",
        ctx,
        identifier=[ctx.ident(KIND_ORGANIZATION, ctx.program_id)],
        active=True,
        name=ctx.program_name,
        telecom=[{"system": "phone", "value": ctx.program_phone, "use": "work"}] if ctx.program_phone else [],
    )
    device = resource(
        "Device",
        ctx,
        identifier=[ctx.ident(KIND_DEVICE, DEVICE_IDENTIFIER_VALUE)],
        status="active",
        manufacturer="peersync project",
        deviceName=[{"name": "peersync connector", "type": "user-friendly-name"}],
        type={"text": "FHIR data connector software"},
        version=[{"value": ctx.connector_version}],
        owner=ctx.organization_ref(),
    )
    written = [with_narrative(device, device_narrative(device, program_name=ctx.program_name))]
    if ctx.directory.existing_organization:
        return written
    return [with_narrative(organization, organization_narrative(organization)), *written]


def supporter_role_concept(s: Supporter | None, ctx: MappingContext) -> dict[str, Any]:
    """The supporter's role: NUCC taxonomy + our title code, text = the title as the program writes it."""
    if s is None:
        return {"text": "Peer supporter"}
    title_code = codes.local_coding(ctx, codes.CS_SUPPORTER_TITLE, s.title.value)
    text = s.title_text or s.original_text.get("title") or title_code["display"]
    return {"coding": [dict(codes.TITLE_TAXONOMY[s.title]), title_code], "text": text}


def _telecom(phone: str | None, email: str | None) -> list[dict[str, Any]]:
    out = []
    if phone:
        out.append({"system": "phone", "value": phone, "use": "work"})
    if email:
        out.append({"system": "email", "value": email, "use": "work"})
    return out


def map_supporter(s: Supporter, ctx: MappingContext) -> list[dict[str, Any]]:
    """A peer supporter as a Practitioner and their PractitionerRole in the program.

    The role's telecom is the supporter's phone/email, else the program phone (US Core pd-1 needs telecom or
    endpoint); with neither, it is omitted and pd-1 fails knowingly (see docs/field-coverage.md).
    With the EHR's own Practitioners (``ctx.directory``) the Practitioner is not written, and the role only when
    the directory says so.
    """
    identifiers = [ctx.ident(KIND_STAFF, s.staff_id)]
    if s.npi:
        identifiers.append({"use": "official", "system": codes.NPI, "value": s.npi})
    practitioner = resource(
        "Practitioner",
        ctx,
        identifier=identifiers,
        active=s.active,
        name=[{"use": "official", "family": s.family_name, "given": [s.given_name]}],
        telecom=_telecom(s.phone, s.email),
    )
    role_telecom = _telecom(s.phone, s.email)
    if not role_telecom and ctx.program_phone:
        role_telecom = [{"system": "phone", "value": ctx.program_phone, "use": "work"}]
    role = resource(
        "PractitionerRole",
        ctx,
        identifier=[ctx.ident(KIND_ROLE, s.staff_id)],
        active=s.active,
        practitioner=ctx.ref("Practitioner", KIND_STAFF, s.staff_id),
        organization=ctx.organization_ref(),
        code=[supporter_role_concept(s, ctx)],
        specialty=[{"coding": [dict(codes.TITLE_TAXONOMY[s.title])]}],
        telecom=role_telecom,
    )
    written = []
    if not ctx.directory.existing_practitioners:
        written.append(with_narrative(practitioner, practitioner_narrative(practitioner, s,
                                                                           program_name=ctx.program_name)))
    if ctx.directory.write_roles:
        written.append(with_narrative(role, practitioner_role_narrative(role, s, program_name=ctx.program_name)))
    return written


@dataclass(frozen=True)
class TeamMember:
    """A supporter who worked with the participant (from the contacts), from the day of their first contact."""

    supporter_id: str
    since: date
    supporter: Supporter | None = None


def map_careteam(e: Enrollment, ctx: MappingContext, supporter: Supporter | None = None,
                 team: Sequence[TeamMember] = ()) -> dict[str, Any]:
    """The participant's CareTeam for one enrollment: the patient, the enrollment's supporter and every other
    supporter in ``team``. Membership periods end when the team is inactive (the enrollment ended)."""
    status = codes.ENTERED_IN_ERROR if e.void else codes.CARETEAM_STATUS[e.status]
    end = iso_date(e.end_date) if e.end_date and status == "inactive" else None
    period = compact({"start": iso_date(e.start_date), "end": iso_date(e.end_date) if e.end_date else None})
    members = [TeamMember(e.supporter_id, e.start_date, supporter)]
    members += sorted((m for m in team if m.supporter_id != e.supporter_id), key=lambda m: (m.since, m.supporter_id))
    careteam = resource(
        "CareTeam",
        ctx,
        identifier=[ctx.ident(KIND_CARETEAM, e.enrollment_id)],
        status=status,
        category=[{"coding": [dict(codes.CARETEAM_LONGITUDINAL)]}],
        name=CARE_TEAM_NAME,
        subject=ctx.patient_ref(e),
        period=period,
        participant=[
            {"role": [{"coding": [dict(codes.SNOMED_PATIENT)], "text": "Patient"}], "member": ctx.patient_ref(e)},
            *(
                {
                    "role": [supporter_role_concept(m.supporter, ctx)],
                    "member": ctx.ref("PractitionerRole", KIND_ROLE, m.supporter_id, _role_display(m.supporter)),
                    # no onBehalfOf: R4 ctm-1 allows it only for a Practitioner member; the role names the program
                    "period": compact({"start": iso_date(max(m.since, e.start_date)), "end": end}),
                }
                for m in members
            ),
        ],
        managingOrganization=[ctx.organization_ref()],
    )
    return with_narrative(careteam, careteam_narrative(careteam, supporter=supporter, program_name=ctx.program_name))


def _role_display(supporter: Supporter | None) -> str:
    # a title, never a name: displays must not carry PHI and staff names add nothing here
    if supporter is None or supporter.title is SupporterTitle.OTHER:
        return "Peer supporter"
    return supporter.title_text or supporter.title.value.replace("-", " ").capitalize()
