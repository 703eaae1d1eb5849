"""US Core Provenance for a change-set: who authored it, and that peersync transmitted it (fhir-modeling.md §7)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from connector.identifiers import KIND_ROLE, KIND_STAFF, conditional_reference, parse_conditional_reference

from . import codes
from ._util import resource
from .context import MappingContext
from .narrative import provenance_narrative, with_narrative

SOURCE_RECORD_KIND = "source-record"


# Where each resource type names the supporter who wrote it: the sender or requester, and note authors.
_AUTHOR_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Communication": ("sender",),
    "CommunicationRequest": ("requester",),
    "ServiceRequest": ("requester",),
    "Task": ("requester",),
    "Goal": ("expressedBy",),
}


def resource_authors(resource: dict[str, Any], ctx: MappingContext) -> list[str]:
    """The supporters who wrote a mapped resource, as PractitionerRole reference strings, in a stable order: the
    sender, requester or (a Procedure's) performer it names and the authors of its notes. Empty when it names none
    (the program Organization then authors it: a participant's own words, the CarePlan, program-wide resources)."""
    found: list[str] = []
    for element in _AUTHOR_ELEMENTS.get(resource["resourceType"], ()):
        found.append(str(resource.get(element, {}).get("reference", "")))
    if resource["resourceType"] == "Procedure":  # a contact as Procedure: its supporter performed it
        found += [str(p.get("actor", {}).get("reference", "")) for p in resource.get("performer", ())]
    found += [str(n.get("authorReference", {}).get("reference", "")) for n in resource.get("note", ())]
    roles = (_as_role(ref, ctx) for ref in found)
    return list(dict.fromkeys(r for r in roles if r))


def _as_role(reference: str, ctx: MappingContext) -> str | None:
    """A supporter's PractitionerRole reference for a PractitionerRole or Practitioner (staff) reference."""
    if reference.startswith("Practitioner/"):  # the EHR's own Practitioner (ctx.directory): the supporter themself
        return reference
    parsed = parse_conditional_reference(reference)
    if parsed is None:
        return None
    resource_type, system, value = parsed
    if resource_type == "PractitionerRole" and system == ctx.system(KIND_ROLE):
        return reference
    if resource_type == "Practitioner" and system == ctx.system(KIND_STAFF):
        return conditional_reference("PractitionerRole", ctx.system(KIND_ROLE), value)
    return None


def map_provenance(
    targets: Sequence[str],
    *,
    activity: Literal["CREATE", "UPDATE", "NULLIFY"],
    author: str | None,
    recorded: datetime,
    ctx: MappingContext,
    source_entities: Sequence[str] = (),
) -> dict[str, Any]:
    """A Provenance over ``targets`` (reference strings, used as given).

    ``author`` is a reference string to the supporter's PractitionerRole; without one the program
    Organization is the author. ``recorded`` is the mapping time (passed in: mappers read no clock).
    ``source_entities`` name the source records behind the change, each ``"system|value"`` or a bare value
    (then in the program's ``source-record`` identifier system); they become ``entity[role=source]``.
    Provenance has no business identifier in R4.
    """
    if not targets:
        raise ValueError("a Provenance needs at least one target")
    organization = ctx.organization_ref()
    author_agent: dict[str, Any] = {"type": {"coding": [dict(codes.PROVENANCE_AUTHOR)]}}
    if author:
        author_agent.update(who={"reference": author}, onBehalfOf=organization)
    else:
        author_agent.update(who=organization)
    transmitter = {
        "type": {"coding": [dict(codes.PROVENANCE_TRANSMITTER)]},
        "who": ctx.device_ref(),
        "onBehalfOf": organization,
    }
    provenance = resource(
        "Provenance",
        ctx,
        target=[{"reference": t} for t in targets],
        recorded=ctx.datetime_str(recorded),
        activity={"coding": [dict(codes.PROVENANCE_ACTIVITY[activity])]},
        agent=[author_agent, transmitter],
        entity=[{"role": "source", "what": {"identifier": _entity_identifier(s, ctx)}} for s in source_entities],
    )
    return with_narrative(provenance, provenance_narrative(provenance, program_name=ctx.program_name,
                                                           timezone=ctx.timezone))


def _entity_identifier(entity: str, ctx: MappingContext) -> dict[str, str]:
    system, sep, value = entity.partition("|")
    if sep and system and value:
        return {"system": system, "value": value}
    return {"system": ctx.system(SOURCE_RECORD_KIND), "value": entity}
