"""A self-management goal as a US Core Goal (fhir-modeling.md §1)."""

from __future__ import annotations

from typing import Any

from connector.identifiers import KIND_GOAL, KIND_ROLE, KIND_STAFF
from connector.model import (
    Behavior,
    Comparator,
    Enrollment,
    Goal,
    GoalAchievement,
    GoalLifecycle,
    GoalSetBy,
    GoalTarget,
)

from . import codes
from ._util import compact, fhir_decimal, iso_date, markdown_text, resource
from .context import MappingContext
from .narrative import goal_narrative, with_narrative


def map_goal(g: Goal, e: Enrollment, ctx: MappingContext) -> dict[str, Any]:
    """A goal in the participant's words, with its ADCES7 behaviour, target, status and progress notes, and the
    EHR's result that shows its outcome when the program recorded one (``outcome_observation``)."""
    notes = [n for n in g.notes if not n.void]
    goal = resource(
        "Goal",
        ctx,
        extension=_acceptance(g, e, ctx),
        identifier=[ctx.ident(KIND_GOAL, g.goal_id)],
        lifecycleStatus=codes.ENTERED_IN_ERROR if g.void else g.lifecycle_status.value,
        achievementStatus=_achievement(g),
        category=_categories(g, ctx),
        description={"text": g.description},
        subject=ctx.patient_ref(e),
        startDate=iso_date(g.start_date),
        target=compact(_targets(g)),
        # only a date the source recorded for the status: a start or note date would claim a change that day
        statusDate=iso_date(g.status_date) if g.status_date else None,
        statusReason=None if g.void else _status_reason(g),
        expressedBy=_expressed_by(g, e, ctx),
        note=compact([
            {
                "authorReference": ctx.ref("Practitioner", KIND_STAFF, n.supporter_id) if n.supporter_id else None,
                "time": iso_date(n.noted_on),
                "text": markdown_text(n.text),
            }
            for n in sorted(notes, key=lambda n: (n.noted_on, n.note_id))
        ]),
        outcomeReference=[_observation_ref(g.outcome_observation)] if g.outcome_observation and not g.void else None,
    )
    return with_narrative(goal, goal_narrative(goal, g))


def _observation_ref(observation: str) -> dict[str, str]:
    """A literal reference to the EHR's Observation: peersync never writes Observations, it only points at them."""
    return {"reference": observation if observation.startswith("Observation/") else f"Observation/{observation}"}


# Achievement codes that say an ended goal was not met.
NOT_MET = frozenset({GoalAchievement.NOT_ACHIEVED, GoalAchievement.NO_PROGRESS, GoalAchievement.NOT_ATTAINABLE})


def _status_reason(g: Goal) -> str | None:
    """Why a goal ended as it did, for receivers that show only lifecycleStatus: "completed" alone reads as met."""
    if g.lifecycle_status in (GoalLifecycle.COMPLETED, GoalLifecycle.CANCELLED) and g.achievement_status in NOT_MET:
        ended = "Completed" if g.lifecycle_status is GoalLifecycle.COMPLETED else "Cancelled"
        return f"{ended} without being achieved ({codes.GOAL_ACHIEVEMENT_DISPLAY[g.achievement_status.value]})"
    return None


def _achievement(g: Goal) -> dict[str, Any] | None:
    if g.achievement_status is None:
        return None
    code = g.achievement_status.value
    return {"coding": [codes.coding(codes.GOAL_ACHIEVEMENT, code, codes.GOAL_ACHIEVEMENT_DISPLAY[code])]}


def _categories(g: Goal, ctx: MappingContext) -> list[dict[str, Any]]:
    out = [
        {"coding": [dict(codes.BEHAVIOR_GOAL_CATEGORY[g.behavior])]},
        codes.local_concept(ctx, codes.CS_ADCES7, g.behavior.value),
    ]
    if g.behavior is Behavior.BEING_ACTIVE:
        # what the Physical Activity IG's Goal profile requires
        out.append({"coding": [dict(codes.PA_PHYSICAL_ACTIVITY)]})
    return out


def _targets(g: Goal) -> list[dict[str, Any]]:
    due = iso_date(g.due_date) if g.due_date else None
    if g.target is None:
        # a due date alone is a legal target (gol-1 only constrains detail without measure)
        return [{"dueDate": due}] if due else []
    measure, quantity = _measure_and_quantity(g.target)
    return [{"measure": measure, "detailQuantity": quantity, "dueDate": due}]


def _measure_and_quantity(t: GoalTarget) -> tuple[dict[str, Any], dict[str, Any]]:
    units = codes.TARGET_UNITS[t.measure]
    default = next(iter(units.values()))
    known = units.get(t.unit) if t.unit else default
    comparator = None if t.comparator is Comparator.EQ else t.comparator.value
    if known is None:
        # an unknown unit: keep the default measure and the unit as written, uncoded (no UCUM claim)
        loinc, display = default[0], default[1]
        quantity = {"value": fhir_decimal(t.value), "comparator": comparator, "unit": t.unit}
    else:
        loinc, display, ucum, human = known
        quantity = {
            "value": fhir_decimal(t.value),
            "comparator": comparator,
            "unit": human,
            "system": codes.UCUM,
            "code": ucum,
        }
    return {"coding": [codes.coding(codes.LOINC, loinc, display)]}, quantity


# FHIR R4 core extension: each stakeholder's acceptance of the goal (individual: Patient | Practitioner)
GOAL_ACCEPTANCE = "http://hl7.org/fhir/StructureDefinition/goal-acceptance"


def _acceptance(g: Goal, e: Enrollment, ctx: MappingContext) -> list[dict[str, Any]]:
    """A goal set together: the participant and the supporter each agreed to it (goal-acceptance, status
    `agree`), which keeps "together" apart from "participant" while expressedBy stays the Patient."""
    if g.set_by is not GoalSetBy.TOGETHER:
        return []
    people = [ctx.patient_ref(e)]
    if g.supporter_id:  # only the supporter the goal names: the enrollment's may not have been there
        people.append(ctx.ref("Practitioner", KIND_STAFF, g.supporter_id))
    return [
        {"url": GOAL_ACCEPTANCE, "extension": [{"url": "individual", "valueReference": who},
                                               {"url": "status", "valueCode": "agree"}]}
        for who in people
    ]


def _expressed_by(g: Goal, e: Enrollment, ctx: MappingContext) -> dict[str, Any] | None:
    if g.set_by in codes.EXPRESSED_BY_SUPPORTER:
        # expressedBy cannot be an Organization: without a named supporter it is left out (0..1, not must-support)
        return ctx.ref("PractitionerRole", KIND_ROLE, g.supporter_id) if g.supporter_id else None
    # set by the participant, or together with the supporter/clinician: the participant owns the goal
    return ctx.patient_ref(e)
