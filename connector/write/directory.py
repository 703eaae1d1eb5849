"""Find the EHR's own directory resources once per sync: the program's Organization by its identifier and each
supporter's Practitioner by the configured identifier (NPI by default), searched in batches.

Only exact (system, value) matches count. None found, or several, is a problem the review queue shows
(``organization-not-found``, ``practitioner-not-found``); the records that need it wait in review and go
through on the first run that finds it. Details name identifiers of staff and organizations, never patient data.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from connector.identifiers import escape_token
from connector.map.directory import (
    ORGANIZATION_NOT_FOUND,
    PRACTITIONER_NOT_FOUND,
    Directory,
    organization_subject,
    supporter_subject,
)
from connector.model import RecordKind, Supporter
from connector.read.staging import Staging
from connector.server.client import FhirClient

log = logging.getLogger(__name__)

BATCH = 30  # identifiers per search (FHIR OR): well under servers' URL limits, as for Patients


def resolve_directory(client: FhirClient, staging: Staging, directory: Directory, program_id: str) -> Directory:
    """``directory`` with the server ids found for the program's Organization and the staged supporters, and a
    problem for each that was not found exactly once."""
    problems: dict[str, tuple[str, str]] = {}
    organization_id = None
    if directory.existing_organization:
        system, value = directory.organization_token()
        found = _exact(client, "Organization", system, [value]).get(value, [])
        if len(found) == 1:
            organization_id = found[0]
        else:
            problems[organization_subject(program_id)] = (
                ORGANIZATION_NOT_FOUND,
                f"{'no' if not found else len(found)} Organization{'s have' if found else ' has'} identifier "
                f"{system}|{value}; set [directory] organization_identifier to the program's Organization on the EHR")
    practitioner_ids: dict[str, str] = {}
    if directory.existing_practitioners:
        system = directory.practitioner_system or ""
        wanted: dict[str, str] = {}  # supporter id -> identifier value
        for supporter in staging.records(RecordKind.SUPPORTER):
            if not isinstance(supporter, Supporter):
                continue
            identifier = directory.supporter_identifier(supporter)
            if identifier is None:
                problems[supporter_subject(supporter.staff_id)] = (
                    PRACTITIONER_NOT_FOUND, f"the supporter has no {directory.practitioner_field} in the source: "
                    "add it so peersync can find their Practitioner on the EHR")
            else:
                wanted[supporter.staff_id] = identifier
        found_by_value = _exact(client, "Practitioner", system, sorted(set(wanted.values())))
        for staff_id, value in wanted.items():
            matches = found_by_value.get(value, [])
            if len(matches) == 1:
                practitioner_ids[staff_id] = matches[0]
            else:
                problems[supporter_subject(staff_id)] = (
                    PRACTITIONER_NOT_FOUND,
                    f"{'no' if not matches else len(matches)} Practitioner{'s have' if matches else ' has'} "
                    f"identifier {system}|{value}; add the supporter to the EHR or correct their "
                    f"{directory.practitioner_field} in the source")
    if problems:
        log.warning("%d directory resource(s) not found on the EHR: the records that need them wait in review",
                    len(problems), extra={"event": "directory-not-found", "count": len(problems)})
    return replace(directory, organization_id=organization_id, practitioner_ids=practitioner_ids, problems=problems)


def _exact(client: FhirClient, resource_type: str, system: str, values: list[str]) -> dict[str, list[str]]:
    """value -> server ids of the resources whose identifier is exactly (system, value), searched in batches.
    A search the server refuses raises: the operator must grant it (``peersync doctor`` checks it)."""
    found: dict[str, list[str]] = {}
    wanted = set(values)
    for start in range(0, len(values), BATCH):
        batch = values[start:start + BATCH]
        query = ",".join(f"{escape_token(system)}|{escape_token(v)}" for v in batch)
        resources: list[dict[str, Any]] = list(client.search(resource_type, {"identifier": query,
                                                                            "_count": str(2 * len(batch))}))
        for resource in resources:
            for key in {(i.get("system"), i.get("value")) for i in resource.get("identifier", [])}:
                if key[0] == system and key[1] in wanted and resource.get("id"):
                    found.setdefault(str(key[1]), []).append(str(resource["id"]))
    return found


