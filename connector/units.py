"""Map planned units to FHIR: the glue between the staging store, the plan and the pure mappers.

Only the units the plan says to write are loaded and mapped. Units come out in dependency order: the
resources others point at (goals, planned contacts, referrals, then the CarePlan) before the
Communications that reference them, so a participant's change-set can be split into several
transactions without a reference ever pointing at something not yet written.
"""

from __future__ import annotations

from collections.abc import Iterable

from connector.bundle import UnitWrite
from connector.mappers import (
    MappingContext,
    map_cbo,
    map_contact,
    map_enrollment,
    map_goal,
    map_planned_contact,
    map_program,
    map_referral,
    map_supporter,
)
from connector.model import Contact, Enrollment, Goal, GoalNote, PlannedContact, RecordKind, Referral, Supporter
from connector.staging import Staging

# Write order inside a participant's change-set (see module docstring).
KIND_ORDER = {"program": 0, "supporter": 1, "cbo": 2, "goal": 3, "planned_contact": 4, "referral": 5,
              "enrollment": 6, "contact": 7}


def map_global_unit(staging: Staging, kind: str, source_id: str, ctx: MappingContext) -> UnitWrite | None:
    """Map a program-wide unit (program, supporter, community organization)."""
    unit_key = f"{kind}:{source_id}"
    if kind == "program":
        return UnitWrite(unit_key, kind, map_program(ctx))
    if kind == "supporter":
        supporter = staging.record(RecordKind.SUPPORTER, source_id)
        return UnitWrite(unit_key, kind, map_supporter(supporter, ctx)) if isinstance(supporter, Supporter) else None
    if kind == "cbo":
        referral = staging.first_referral_for_cbo(source_id)
        resource = map_cbo(referral, ctx) if isinstance(referral, Referral) else None
        return UnitWrite(unit_key, kind, [resource]) if resource else None
    raise ValueError(f"not a program-wide unit kind: {kind}")


def map_participant_units(
    staging: Staging, participant: str, units: Iterable[tuple[str, str]], ctx: MappingContext
) -> list[UnitWrite]:
    """Map one participant's units ((kind, source id) pairs) in dependency order."""
    enrollment = staging.record(RecordKind.ENROLLMENT, participant)
    if not isinstance(enrollment, Enrollment):
        return []
    out: list[UnitWrite] = []
    for kind, source_id in sorted(units, key=lambda u: KIND_ORDER.get(u[0], 99)):
        unit = _map_one(staging, enrollment, kind, source_id, ctx)
        if unit is not None:
            out.append(unit)
    return out


def _map_one(staging: Staging, enrollment: Enrollment, kind: str, source_id: str,
             ctx: MappingContext) -> UnitWrite | None:
    unit_key = f"{kind}:{source_id}"
    participant = enrollment.enrollment_id
    if kind == "enrollment":
        resources = map_enrollment(
            enrollment,
            goal_ids=staging.keys(RecordKind.GOAL, participant),
            planned_contact_ids=staging.keys(RecordKind.PLANNED_CONTACT, participant),
            referral_ids=staging.keys(RecordKind.REFERRAL, participant),
            ctx=ctx,
            supporter=staging.record(RecordKind.SUPPORTER, enrollment.supporter_id),
        )
        return UnitWrite(unit_key, kind, resources, voided=False)
    record = staging.record(RecordKind(kind), source_id)
    if record is None:
        return None
    if isinstance(record, Goal):
        notes = tuple(n for n in staging.records(RecordKind.GOAL_NOTE, participant)
                      if isinstance(n, GoalNote) and n.goal_id == record.goal_id)
        record = record.model_copy(update={"notes": notes})
        return UnitWrite(unit_key, kind, [map_goal(record, enrollment, ctx)], voided=record.void)
    if isinstance(record, Contact):
        return UnitWrite(unit_key, kind, [map_contact(record, enrollment, ctx)], voided=record.void)
    if isinstance(record, PlannedContact):
        return UnitWrite(unit_key, kind, [map_planned_contact(record, enrollment, ctx)], voided=record.void)
    if isinstance(record, Referral):
        return UnitWrite(unit_key, kind, map_referral(record, enrollment, ctx), voided=record.void)
    return None
