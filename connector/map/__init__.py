"""Pure mappers from the source model (:mod:`connector.model`) to FHIR R4 resources as plain dicts.

No I/O and no clock: everything comes from the record and a :class:`MappingContext`. References between
resources are conditional references (``Goal?identifier=system|value``) that the bundle builder rewrites.
See docs/fhir-mapping.md for each resource and docs/field-coverage.md for every source field.
"""

from __future__ import annotations

from .careplan import map_enrollment
from .codes import US_CORE_PROFILES
from .communication import map_cancelled_contact_request, map_contact
from .context import DEFAULT_TERMINOLOGY_BASE, MappingContext
from .goal import map_goal
from .people import TeamMember, map_program, map_supporter
from .procedure import map_contact_procedure
from .provenance import map_provenance, resource_authors
from .requests import map_cbo, map_planned_contact, map_referral

__all__ = [
    "DEFAULT_TERMINOLOGY_BASE",
    "US_CORE_PROFILES",
    "MappingContext",
    "TeamMember",
    "map_cancelled_contact_request",
    "map_cbo",
    "map_contact",
    "map_contact_procedure",
    "map_enrollment",
    "map_goal",
    "map_planned_contact",
    "map_program",
    "map_provenance",
    "map_referral",
    "map_supporter",
    "resource_authors",
]
