"""Existing directory resources: the program's Organization and the supporters' Practitioners that the EHR
already holds and will not let an outside system create (docs/configuration.md, ``[directory]``).

A :class:`Directory` says which of them peersync references instead of writing, and carries the server ids a
sync found for them by search (once per run, :mod:`connector.write.directory`). Mappers read it through
:class:`~connector.map.context.MappingContext` and write literal ``Type/id`` references; pure decisions about
what a unit needs that the EHR lacks live here too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from connector.identifiers import (
    KIND_ROLE,
    KIND_STAFF,
    identifier_system,
    identifier_value,
    parse_conditional_reference,
    reference_strings,
)
from connector.model import Supporter

NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"

ORGANIZATION_NOT_FOUND = "organization-not-found"
PRACTITIONER_NOT_FOUND = "practitioner-not-found"


@dataclass(frozen=True)
class Directory:
    """Which directory resources the EHR holds already, and what a run found of them.

    Attributes:
        organization_identifier: ``system|value`` of the program's Organization on the EHR; set: peersync
            references it and never writes the program's Organization.
        practitioner_system: the identifier system the EHR's Practitioners carry (NPI by default); set:
            peersync references each supporter's Practitioner and never writes Practitioner.
        practitioner_field: the supporter field holding the value in that system (``npi`` or ``staff_id``).
        write_roles: peersync writes the supporters' PractitionerRoles; False: references to a supporter's role
            point at the supporter's Practitioner instead (every element peersync fills allows Practitioner).
        organization_id: the server id of the Organization, found by this run (None: not searched or not found).
        practitioner_ids: supporter source id -> server id of their Practitioner, found by this run.
        problems: review subject -> (reason, PHI-free detail) of what this run did not find.
    """

    organization_identifier: str | None = None
    practitioner_system: str | None = None
    practitioner_field: Literal["npi", "staff_id"] = "npi"
    write_roles: bool = True
    organization_id: str | None = field(default=None, compare=False)
    practitioner_ids: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    problems: Mapping[str, tuple[str, str]] = field(default_factory=dict, compare=False, hash=False)

    @property
    def existing_organization(self) -> bool:
        """The program's Organization is the EHR's own: referenced, never written."""
        return self.organization_identifier is not None

    @property
    def existing_practitioners(self) -> bool:
        """The supporters' Practitioners are the EHR's own: referenced, never written."""
        return self.practitioner_system is not None

    @property
    def writes_supporters(self) -> bool:
        """peersync writes anything for a supporter (their Practitioner or PractitionerRole)."""
        return not self.existing_practitioners or self.write_roles

    def fingerprint_parts(self) -> tuple[str, ...]:
        """What changes every reference peersync writes: empty when peersync writes its own directory (so the
        mapping fingerprint of such deployments is unchanged)."""
        if self == Directory():
            return ()
        return ("directory", self.organization_identifier or "", self.practitioner_system or "",
                self.practitioner_field, str(self.write_roles))

    def organization_token(self) -> tuple[str, str]:
        """(system, value) of the EHR's Organization."""
        system, _, value = (self.organization_identifier or "").rpartition("|")
        return system, value

    def supporter_identifier(self, supporter: Supporter) -> str | None:
        """The supporter's identifier value in ``practitioner_system`` (from the configured source field)."""
        value = supporter.npi if self.practitioner_field == "npi" else supporter.staff_id
        return value or None


def organization_subject(program_id: str) -> str:
    """The review subject of the program's missing Organization."""
    return f"organization:{program_id}"


def supporter_subject(supporter_id: str) -> str:
    """The review subject of a supporter whose Practitioner the EHR lacks."""
    return f"supporter:{supporter_id}"


def missing_directory_entries(resources: Iterable[dict[str, Any]], directory: Directory, *, base_url: str,
                              program_id: str) -> list[str]:
    """The review subjects (of ``directory.problems``) a unit's resources need and the EHR lacks, sorted.

    Every resource needs the program's Organization when it is the EHR's (the Provenance written with each
    change names it). A supporter is needed when a resource refers to their Practitioner or PractitionerRole
    and this run found no Practitioner for them.
    """
    needed: set[str] = set()
    organization = organization_subject(program_id)
    if directory.existing_organization and organization in directory.problems:
        needed.add(organization)
    if directory.existing_practitioners:
        staff = {identifier_system(base_url, program_id, kind) for kind in (KIND_STAFF, KIND_ROLE)}
        missing = {identifier_value(s.partition(":")[2]): s for s in directory.problems if s.startswith("supporter:")}
        for resource in resources:
            for reference in reference_strings(resource):
                target = parse_conditional_reference(reference)
                if target is not None and target[1] in staff and target[2] in missing:
                    needed.add(missing[target[2]])
    return sorted(needed)
