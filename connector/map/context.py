"""The mapping context: who is mapping (program, identifier namespace) and how to refer to things.

Everything a mapper needs besides the source record lives here, so mappers stay pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

from connector import __version__
from connector.identifiers import (
    KIND_DEVICE,
    KIND_ORGANIZATION,
    KIND_ROLE,
    KIND_STAFF,
    conditional_reference,
    identifier_system,
    identifier_value,
)
from connector.map.directory import Directory

if TYPE_CHECKING:
    from connector.model import Enrollment
    from connector.read.profile import Profile

# Canonical base of peersync's own CodeSystems, ValueSets and extensions: the GitHub Pages host of the GitHub
# organisation that owns peersync's repository (github.com/peersync), so the project controls it and can serve the
# package there. One base for every program and deployment, never rewritten: one code has one system everywhere
# (docs/fhir-modeling-corrections.md, "Canonical URLs"). The files of mappings/terminology/ are written under it.
TERMINOLOGY_BASE = "https://peersync.github.io/fhir"
DEFAULT_TERMINOLOGY_BASE = TERMINOLOGY_BASE  # the name earlier releases exported

# How contacts reach the server (`[server] contact_procedures`): Communication only, also a US Core Procedure, or
# the Procedure alone.
ContactProcedures = Literal["off", "also", "instead"]

# How an open referral's Task reaches the server (`[server] referral_tasks`): `requested` (R4: "ready to be acted
# upon"), or `draft` ("not yet ready to be acted upon") for receivers that start work on any requested Task they own
# when the program has already made the referral by other means.
ReferralTasks = Literal["requested", "draft"]

# The value of the connector Device's business identifier (one Device per program: the system carries the program).
DEVICE_IDENTIFIER_VALUE = "peersync"


@lru_cache(maxsize=65536)
def _identifier_reference(resource_type: str, base_url: str, program_id: str, kind: str, source_id: str) -> str:
    # cached: a participant's contacts refer to the same plan, supporter and goals again and again
    return conditional_reference(resource_type, identifier_system(base_url, program_id, kind),
                                 identifier_value(source_id))


def code_system_url(cs_id: str) -> str:
    """Canonical URL of one of our CodeSystems (one base for every deployment)."""
    return f"{TERMINOLOGY_BASE}/CodeSystem/{cs_id}"


@dataclass(frozen=True, slots=True)
class MappingContext:
    """Program-level settings every mapper needs.

    Attributes:
        program_id: short program id, used in identifier systems (``{base_url}/sid/{program_id}/{kind}``).
        program_name: the program's name (Organization.name, ``assigner.display``).
        base_url: the program's canonical base for identifier systems (no trailing ``/``).
        mrn_system: the clinic's MRN identifier system, used to reference the Patient.
        timezone: IANA zone of the program; applied to naive date-times (e.g. a naive Provenance time).
        connector_version: the connector's version (Device.version).
        program_phone: the program's phone, used as PractitionerRole telecom when a supporter has none (pd-1).
        referral_codes: the profile's ServiceRequest.code per referral need, ``(need, system, code, display)``;
            they replace the shipped table (``mappings/referral-codes.yaml``) for those needs.
        referral_resource_codes: the profile's ServiceRequest.code per community resource,
            ``(resource_id, system, code, display)``: what the program really refers to; before any need's code.
        clinical_notes: clinical-note mode: ``off``, ``also`` (notes and the structured resources) or ``only``.
        note_period: what one note covers: one ``contact``, an ISO ``week`` or a calendar ``month``.
        organization_tasks: referral Tasks whose status belongs to the community organization (see below).
        clinic_referral_requests: the ServiceRequests of the clinic referrals enrollments answer (see below).
        directory: the Organization and Practitioners the EHR holds already (referenced, not written) and the
            server ids a sync found for them (connector.map.directory).
        contact_procedures: how contacts reach the server: ``off`` (Communication only), ``also`` (Communication
            and a US Core Procedure) or ``instead`` (Procedure only); a per-server setting.
        referral_tasks: the status of an open referral's Task: ``requested`` or ``draft``; a per-server setting.
    """

    program_id: str
    program_name: str
    base_url: str
    mrn_system: str
    timezone: str = "UTC"
    connector_version: str = __version__
    program_phone: str | None = None
    referral_codes: tuple[tuple[str, str, str, str], ...] = ()
    referral_resource_codes: tuple[tuple[str, str, str, str], ...] = ()
    clinical_notes: str = "off"
    note_period: str = "month"
    # Referral Tasks a community organization changed since peersync wrote them (identifier value -> the server's
    # Task): their status, reason and outputs are the organization's (connector.pull.community). Filled by a
    # sync from the server, never from the source; not part of the mapping fingerprint.
    organization_tasks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, compare=False, hash=False)
    # Clinic referral Task id -> the server id of its ServiceRequest (CarePlan.basedOn), read by a sync.
    clinic_referral_requests: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    directory: Directory = field(default_factory=Directory)
    contact_procedures: ContactProcedures = "off"
    referral_tasks: ReferralTasks = "requested"

    @classmethod
    def from_profile(cls, profile: Profile, **overrides: Any) -> MappingContext:
        """A context from a mapping profile's ``program`` section (keyword arguments override fields)."""
        program = profile.program
        values: dict[str, Any] = {
            "program_id": program.id,
            "program_name": program.name,
            "base_url": program.base_url,
            "mrn_system": program.mrn_system,
            "timezone": program.timezone,
            "program_phone": program.phone,
            "referral_codes": tuple(sorted((need.value, c.system, c.code, c.display)
                                           for need, c in program.referral_codes.needs.items())),
            "referral_resource_codes": tuple(sorted((resource_id, c.system, c.code, c.display)
                                                    for resource_id, c in program.referral_codes.resources.items())),
        }
        values.update(overrides)
        return cls(**values)

    # -- identifiers ---------------------------------------------------------------------------------------------

    def system(self, kind: str) -> str:
        """The identifier system of one kind of record of this program."""
        return identifier_system(self.base_url, self.program_id, kind)

    def ident(self, kind: str, source_id: str) -> dict[str, Any]:
        """The official business identifier of a record: ``{use, system, value, assigner}``."""
        return {
            "use": "official",
            "system": self.system(kind),
            "value": identifier_value(source_id),
            "assigner": {"display": self.program_name},
        }

    # -- references ----------------------------------------------------------------------------------------------

    def ref(self, resource_type: str, kind: str, source_id: str, display: str | None = None) -> dict[str, Any]:
        """A conditional reference to one of our resources, by its business identifier; a supporter's
        Practitioner the EHR holds (``directory``) by its server id."""
        if resource_type == "PractitionerRole" and kind == KIND_ROLE and not self.directory.write_roles:
            resource_type, kind = "Practitioner", KIND_STAFF  # no roles written: the supporter themself
        found = self.directory.practitioner_ids.get(source_id) if kind == KIND_STAFF else None
        if resource_type == "Practitioner" and self.directory.existing_practitioners and found:
            out: dict[str, Any] = {"reference": f"Practitioner/{found}"}
        else:
            out = {"reference": _identifier_reference(resource_type, self.base_url, self.program_id, kind, source_id)}
        if display:
            out["display"] = display
        return out

    def patient_ref(self, enrollment: Enrollment) -> dict[str, Any]:
        """The Patient, by MRN (the bundle builder resolves it; never with a display: that would be PHI)."""
        return {"reference": conditional_reference("Patient", enrollment.mrn_system or self.mrn_system, enrollment.mrn)}

    def organization_ref(self) -> dict[str, Any]:
        """The program's Organization: peersync's own, or the EHR's (``directory``) by server id once found, by
        its identifier until then."""
        if self.directory.existing_organization:
            system, value = self.directory.organization_token()
            reference = (f"Organization/{self.directory.organization_id}" if self.directory.organization_id
                         else conditional_reference("Organization", system, value))
            return {"reference": reference}  # no display: the EHR names its own Organization
        return self.ref("Organization", KIND_ORGANIZATION, self.program_id, self.program_name)

    def device_ref(self) -> dict[str, Any]:
        """The connector's Device (transmitter)."""
        return self.ref("Device", KIND_DEVICE, DEVICE_IDENTIFIER_VALUE, "peersync connector")

    # -- terminology and metadata --------------------------------------------------------------------------------

    @property
    def terminology_base(self) -> str:
        """Canonical base of peersync's CodeSystems and extensions: the same for every deployment."""
        return TERMINOLOGY_BASE

    def code_system(self, cs_id: str) -> str:
        """Canonical URL of one of our CodeSystems."""
        return code_system_url(cs_id)

    def extension_url(self, sd_id: str) -> str:
        """Canonical URL of one of our extensions."""
        return f"{TERMINOLOGY_BASE}/StructureDefinition/{sd_id}"

    @property
    def meta_source(self) -> str:
        """``meta.source`` of everything we write: this program's peersync connector.

        No version and no ``#``: HAPI keeps only the part before ``#`` (it appends its request id), and a version
        here would change every resource's content hash on each upgrade and re-send everything.
        """
        return f"{self.base_url}/peersync/{self.program_id}"

    def meta(self) -> dict[str, Any]:
        """The ``meta`` element of a mapped resource."""
        return {"source": self.meta_source}

    def datetime_str(self, value: datetime) -> str:
        """ISO 8601 with offset; a naive value is read in the program's time zone."""
        if value.tzinfo is None or value.utcoffset() is None:
            value = value.replace(tzinfo=ZoneInfo(self.timezone))
        return value.isoformat()
