"""Map planned units to FHIR: the glue between the staging store, the plan and the pure mappers.

Only the units the plan says to write are loaded and mapped. Units come out in dependency order: the
resources others point at (goals, planned contacts, referrals, then the CarePlan) before the
Communications that reference them, so a participant's change-set can be split into several
transactions without a reference ever pointing at something not yet written.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import orjson
from pydantic import BaseModel, ConfigDict

from connector.map import (
    MappingContext,
    TeamMember,
    map_cancelled_contact_request,
    map_cbo,
    map_contact,
    map_contact_procedure,
    map_enrollment,
    map_goal,
    map_planned_contact,
    map_program,
    map_referral,
    map_supporter,
)
from connector.map.note import NoteSources, amended, group_notes, map_note
from connector.model import (
    RECORD_MODELS,
    Contact,
    ContactOutcome,
    Enrollment,
    Goal,
    GoalNote,
    PlannedContact,
    RecordKind,
    Referral,
    SourceRecord,
    Supporter,
)
from connector.read.staging import Staging
from connector.write.bundle import PendingWrite, UnitWrite

if TYPE_CHECKING:
    from connector.plan.planner import PlannedUnit

# Write order inside a participant's change-set (see module docstring).
KIND_ORDER = {"program": 0, "supporter": 1, "cbo": 2, "goal": 3, "planned_contact": 4, "referral": 5,
              "enrollment": 6, "contact": 7, "note": 8}


# The record kinds that are units of a participant besides the enrollment itself.
PARTICIPANT_KINDS = (RecordKind.GOAL, RecordKind.PLANNED_CONTACT, RecordKind.REFERRAL, RecordKind.CONTACT)


class _TeamFacts(BaseModel):
    """The four fields of a staged contact that the care team needs: parsing only these costs a fraction of
    parsing the whole contact (the staged body was validated when it was read)."""

    model_config = ConfigDict(extra="ignore")

    supporter_id: str
    occurred_at: datetime
    outcome: ContactOutcome = ContactOutcome.COMPLETED
    void: bool = False


def map_global_units(staging: Staging, ctx: MappingContext) -> list[UnitWrite]:
    """Every program-wide unit of the staged input, mapped: the program, its supporters, the community
    organizations its referrals name."""
    units = [map_global_unit(staging, "program", ctx.program_id, ctx)]
    units += [map_global_unit(staging, "supporter", s.key, ctx) for s in staging.records(RecordKind.SUPPORTER)]
    cbo_ids = [r[0] for r in staging.db.execute(
        "SELECT DISTINCT json_extract(body,'$.resource_id') FROM staged WHERE kind='referral' "
        "AND json_extract(body,'$.resource_id') IS NOT NULL ORDER BY 1")]
    units += [map_global_unit(staging, "cbo", c, ctx) for c in cbo_ids]
    return [u for u in units if u is not None]


def participant_unit_keys(staging: Staging, participant: str) -> list[tuple[str, str]]:
    """(kind, source id) of every unit of one participant in the staged input, the enrollment first."""
    return [("enrollment", participant)] + [
        (kind.value, key) for kind in PARTICIPANT_KINDS for key in staging.keys(kind, participant)]


def map_global_unit(staging: Staging, kind: str, source_id: str, ctx: MappingContext) -> UnitWrite | None:
    """Map a program-wide unit (program, supporter, community organization)."""
    unit_key = f"{kind}:{source_id}"
    if kind == "program":
        return UnitWrite(unit_key, kind, map_program(ctx))
    if kind == "supporter":
        supporter = staging.record(RecordKind.SUPPORTER, source_id)
        resources = map_supporter(supporter, ctx) if isinstance(supporter, Supporter) else []
        return UnitWrite(unit_key, kind, resources) if resources else None  # none: the EHR's own (ctx.directory)
    if kind == "cbo":
        referral = staging.first_referral_for_cbo(source_id)
        resource = map_cbo(referral, ctx) if isinstance(referral, Referral) else None
        return UnitWrite(unit_key, kind, [resource]) if resource else None
    raise ValueError(f"not a program-wide unit kind: {kind}")


def map_planned_global_units(staging: Staging, planned: Iterable[PlannedUnit],
                             ctx: MappingContext) -> list[PendingWrite]:
    """The planned program-wide units, mapped, each with the plan's hash."""
    writes = []
    for unit in planned:
        mapped = map_global_unit(staging, unit.kind, unit.source_id, ctx)
        if mapped is not None:
            writes.append(PendingWrite(mapped, unit.unit_hash, first_send=unit.action == "create"))
    return writes


def iter_planned_units(staging: Staging, participant: str, planned: Sequence[PlannedUnit],
                       ctx: MappingContext, *, condition_refs: Sequence[str] = ()) -> Iterator[PendingWrite]:
    """A participant's planned units, mapped one at a time in dependency order, each with the plan's hash.

    ``condition_refs``: the EHR's Conditions the enrollment addresses (found by the write stage)."""
    by_key = {unit.unit_key: unit for unit in planned}
    for mapped in iter_participant_units(staging, participant, [(u.kind, u.source_id) for u in planned], ctx,
                                         condition_refs=condition_refs):
        unit = by_key.get(mapped.unit_key)
        first_send = unit is not None and unit.action == "create"
        if mapped.kind == "note" and unit is not None and unit.action in ("update", "void"):
            mapped.resources[:] = [amended(r) for r in mapped.resources]  # a new version of a note already sent
        yield PendingWrite(mapped, unit.unit_hash if unit else None, first_send=first_send)


def map_participant_units(
    staging: Staging, participant: str, units: Iterable[tuple[str, str]], ctx: MappingContext
) -> list[UnitWrite]:
    """Map one participant's units ((kind, source id) pairs) in dependency order."""
    return list(iter_participant_units(staging, participant, units, ctx))


def iter_participant_units(
    staging: Staging, participant: str, units: Iterable[tuple[str, str]], ctx: MappingContext, *,
    condition_refs: Sequence[str] = (),
) -> Iterator[UnitWrite]:
    """Like :func:`map_participant_units`, mapping each unit only when it is asked for (memory stays flat for a
    participant with thousands of contacts)."""
    records = _ParticipantRecords(staging, participant)
    enrollment = records.record(RecordKind.ENROLLMENT, participant)
    if not isinstance(enrollment, Enrollment):
        return
    for kind, source_id in sorted(units, key=lambda u: KIND_ORDER.get(u[0], 99)):
        unit = _map_one(records, enrollment, kind, source_id, ctx, condition_refs)
        if unit is not None:
            yield unit


class _ParticipantRecords:
    """One participant's staged records, read with one query and parsed only when a unit needs them."""

    def __init__(self, staging: Staging, participant: str) -> None:
        self.staging = staging
        self.participant = participant
        self.bodies: dict[tuple[str, str], str] = {}
        self.keys_by_kind: dict[str, list[str]] = {}
        for kind, key, body in staging.participant_rows(participant):
            self.bodies[(kind, key)] = body
            self.keys_by_kind.setdefault(kind, []).append(key)
        self._notes: dict[str, list[GoalNote]] | None = None
        self._clinical_notes: dict[str, NoteSources] | None = None
        self._shared: dict[tuple[RecordKind, str], SourceRecord | None] = {}

    def record(self, kind: RecordKind, key: str) -> SourceRecord | None:
        body = self.bodies.get((kind.value, key))
        if body is None:  # not this participant's (or not staged): ask the store, as before
            return self.staging.record(kind, key)
        return RECORD_MODELS[kind].model_validate_json(body)

    def shared(self, kind: RecordKind, key: str) -> SourceRecord | None:
        """A record several units read (a supporter, a goal a contact discussed), parsed once per participant."""
        if (kind, key) not in self._shared:
            self._shared[(kind, key)] = self.record(kind, key)
        return self._shared[(kind, key)]

    def keys(self, kind: RecordKind) -> list[str]:
        return list(self.keys_by_kind.get(kind.value, ()))

    def team(self, ctx: MappingContext) -> list[TeamMember]:
        """Every supporter who worked with the participant (a contact that was not cancelled nor voided), from
        their first contact's day in the program's time zone."""
        first: dict[str, date] = {}
        zone = ZoneInfo(ctx.timezone)
        for key in self.keys_by_kind.get(RecordKind.CONTACT.value, ()):
            contact = _TeamFacts.model_validate_json(self.bodies[(RecordKind.CONTACT.value, key)])
            if contact.void or contact.outcome is ContactOutcome.CANCELLED:
                continue
            day = contact.occurred_at.astimezone(zone).date()
            first[contact.supporter_id] = min(day, first.get(contact.supporter_id, day))
        members = []
        for supporter_id, since in sorted(first.items()):
            supporter = self.record(RecordKind.SUPPORTER, supporter_id)
            members.append(TeamMember(supporter_id, since, supporter if isinstance(supporter, Supporter) else None))
        return members

    def notes(self, goal_id: str) -> tuple[GoalNote, ...]:
        """The participant's notes on one goal, in input order (all notes parsed once per participant)."""
        if self._notes is None:
            self._notes = {}
            for key in self.keys_by_kind.get(RecordKind.GOAL_NOTE.value, ()):
                note = GoalNote.model_validate_json(self.bodies[(RecordKind.GOAL_NOTE.value, key)])
                self._notes.setdefault(note.goal_id, []).append(note)
        return tuple(self._notes.get(goal_id, ()))

    def all_of(self, kind: RecordKind) -> list[SourceRecord]:
        """Every staged record of one kind of this participant, in input order."""
        return [r for r in (self.record(kind, key) for key in self.keys(kind)) if r is not None]

    def clinical_notes(self, ctx: MappingContext) -> dict[str, NoteSources]:
        """The participant's clinical notes by source id (grouped once per participant)."""
        if self._clinical_notes is None:
            self._clinical_notes = {}
            enrollment = self.record(RecordKind.ENROLLMENT, self.participant)
            if isinstance(enrollment, Enrollment):
                contacts = [c for c in self.all_of(RecordKind.CONTACT) if isinstance(c, Contact)]
                planned = [p for p in self.all_of(RecordKind.PLANNED_CONTACT) if isinstance(p, PlannedContact)]
                goals = [g.model_copy(update={"notes": self.notes(g.goal_id)})
                         for g in self.all_of(RecordKind.GOAL) if isinstance(g, Goal)]
                referrals = [r for r in self.all_of(RecordKind.REFERRAL) if isinstance(r, Referral)]
                staff = sorted({c.supporter_id for c in contacts} | {p.supporter_id for p in planned if p.supporter_id})
                supporters = {s: rec for s in staff
                              if isinstance(rec := self.staging.record(RecordKind.SUPPORTER, s), Supporter)}
                for note in group_notes(enrollment, contacts, goals, referrals, planned, supporters,
                                        kind=ctx.note_period, timezone=ctx.timezone):  # type: ignore[arg-type]
                    self._clinical_notes[note.source_id] = note
        return self._clinical_notes


def participant_notes(staging: Staging, participant: str, ctx: MappingContext) -> list[NoteSources]:
    """One participant's clinical notes (what the planner hashes and the note units map)."""
    return list(_ParticipantRecords(staging, participant).clinical_notes(ctx).values())


def contact_resources(contact: Contact, enrollment: Enrollment, ctx: MappingContext, *, goals: Sequence[Goal] = (),
                      supporter: Supporter | None = None) -> list[dict[str, Any]]:
    """A contact's resources as ``ctx.contact_procedures`` asks: its Communication, a US Core Procedure beside it
    (``also``), or the Procedure alone (``instead``); a cancelled contact's revoked CommunicationRequest first in
    every mode. The Communication and the Procedure carry the contact's business identifier, each under its own
    system, so a rerun updates them in place. ``goals`` and ``supporter`` feed the Communication's narrative."""
    request = map_cancelled_contact_request(contact, enrollment, ctx)
    resources = [request] if request else []
    if ctx.contact_procedures != "instead":
        resources.append(map_contact(contact, enrollment, ctx, goals=goals, supporter=supporter))
    if ctx.contact_procedures != "off":
        resources.append(map_contact_procedure(contact, enrollment, ctx, goals=goals, supporter=supporter))
    return resources


def _contacts_and_contributors(records: _ParticipantRecords) -> tuple[list[tuple[str, str | None]], list[str]]:
    """The performed contacts (id, planned contact id) and the supporters who contributed any record, in input
    order. Kept in step with the enrollment unit's hash in connector/plan/planner.py."""
    performed: list[tuple[str, str | None]] = []
    contributors: list[str] = []
    for kind in (RecordKind.GOAL, RecordKind.PLANNED_CONTACT, RecordKind.REFERRAL, RecordKind.CONTACT):
        for key in records.keys(kind):
            # the staged body was validated when it was read: a plain parse of five fields is enough (a participant
            # may have thousands of contacts, and a new one resends the CarePlan)
            body = orjson.loads(records.bodies[(kind.value, key)])
            if body.get("void"):
                continue
            if body.get("supporter_id"):
                contributors.append(body["supporter_id"])
            if kind is RecordKind.CONTACT and body.get("outcome", ContactOutcome.COMPLETED) == ContactOutcome.COMPLETED:
                performed.append((body["contact_id"], body.get("planned_contact_id")))
    return performed, list(dict.fromkeys(contributors))


def _map_one(records: _ParticipantRecords, enrollment: Enrollment, kind: str, source_id: str,
             ctx: MappingContext, condition_refs: Sequence[str] = ()) -> UnitWrite | None:
    unit_key = f"{kind}:{source_id}"
    if kind == "enrollment":
        supporter = records.record(RecordKind.SUPPORTER, enrollment.supporter_id)
        performed, contributors = _contacts_and_contributors(records)
        goal_ids = records.keys(RecordKind.GOAL)
        goal_records = [records.record(RecordKind.GOAL, g) for g in goal_ids]
        resources = map_enrollment(
            enrollment,
            goal_ids=goal_ids,
            goal_words={g.goal_id: g.description for g in goal_records if isinstance(g, Goal)},
            planned_contact_ids=records.keys(RecordKind.PLANNED_CONTACT),
            referral_ids=records.keys(RecordKind.REFERRAL),
            ctx=ctx,
            supporter=supporter if isinstance(supporter, Supporter) else None,
            team=records.team(ctx),
            performed_contacts=performed,
            contributor_ids=contributors,
            condition_refs=condition_refs,
        )
        return UnitWrite(unit_key, kind, resources, voided=False)
    if kind == "note":
        note = records.clinical_notes(ctx).get(source_id)
        return UnitWrite(unit_key, kind, [map_note(note, ctx)], voided=note.voided) if note else None
    record = records.record(RecordKind(kind), source_id)
    if record is None:
        return None
    if isinstance(record, Goal):
        record = record.model_copy(update={"notes": records.notes(record.goal_id)})
        return UnitWrite(unit_key, kind, [map_goal(record, enrollment, ctx)], voided=record.void)
    if isinstance(record, Contact):
        # the narrative names the supporter and quotes the goals discussed (both in the contact's unit hash)
        supporter = records.shared(RecordKind.SUPPORTER, record.supporter_id)
        goals = [g for g in (records.shared(RecordKind.GOAL, gid) for gid in record.goal_ids) if isinstance(g, Goal)]
        resources = contact_resources(record, enrollment, ctx, goals=goals,
                                      supporter=supporter if isinstance(supporter, Supporter) else None)
        return UnitWrite(unit_key, kind, resources, voided=record.void)
    if isinstance(record, PlannedContact):
        return UnitWrite(unit_key, kind, [map_planned_contact(record, enrollment, ctx)], voided=record.void)
    if isinstance(record, Referral):
        return UnitWrite(unit_key, kind, map_referral(record, enrollment, ctx), voided=record.void)
    return None
