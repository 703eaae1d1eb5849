"""Plan: compare what the input says now with what the ledger says the server has.

A *unit* is one source record and the resources mapped from it (a contact -> Communication; an enrollment
-> CarePlan + CareTeam; a referral -> ServiceRequest + Task...). Its hash covers everything that changes
its resources: the record, the records it lists (an enrollment's goals, a goal's notes), the records its
narrative names (a contact's supporter, and the words of the goals it discussed), the participant's MRN, and the mapping
fingerprint. Unchanged units cost nothing: they are neither mapped nor sent.

The plan is computed in SQL inside the staging database (the ledger attached), so memory stays flat.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from connector.map.context import MappingContext
from connector.map.units import participant_notes
from connector.plan.ledger import Ledger, UnitState
from connector.plan.shape import KindShape
from connector.read.staging import Staging, record_hash


class Act(StrEnum):
    """What a run does with a unit."""

    CREATE = "create"
    UPDATE = "update"
    VOID = "void"  # the source voided it: send it as entered-in-error
    DELETE = "delete"  # gone from the source: void it on the server
    RETRY = "retry"  # unchanged, but not confirmed yet (pending or waiting for review)
    UNCHANGED = "unchanged"
    QUARANTINED = "quarantined"  # same content the server rejected before: not resent until it, or another
    # record of the same participant, changes (a fixed goal lets the CarePlan that lists it through), or a
    # record it refers to is written or has landed since (its supporter, planned contact, goals, CarePlan)
    HELD = "held"  # an update, void or deletion the shape guard held back (connector/plan/shape.py)
    PARKED = "parked"  # same content, parked: the server does not accept one of its types (connector/write/limits.py)


WRITE_ACTIONS = frozenset({Act.CREATE, Act.UPDATE, Act.VOID, Act.DELETE, Act.RETRY})

# Units that belong to no participant, written first and once per run.
GLOBAL_KINDS = ("program", "supporter", "cbo")
# A participant's structured units (not written in clinical-note mode "only"), and its clinical notes.
STRUCTURED_KINDS = ("contact", "goal", "planned_contact", "referral", "enrollment")
NOTE_KIND = "note"
# Which resource types each unit kind produces (for per-type plan counts).
UNIT_RESOURCE_TYPES: dict[str, tuple[str, ...]] = {
    "program": ("Organization", "Device"),
    "supporter": ("Practitioner", "PractitionerRole"),
    "cbo": ("Organization",),
    "enrollment": ("CarePlan", "CareTeam"),
    "goal": ("Goal",),
    "contact": ("Communication",),
    "planned_contact": ("CommunicationRequest",),
    "referral": ("ServiceRequest", "Task"),
    "note": ("DocumentReference",),
}


def unit_resource_types(kind: str, contact_procedures: str = "off") -> tuple[str, ...]:
    """The resource types a unit of ``kind`` produces under ``[server] contact_procedures``."""
    if kind == "contact" and contact_procedures == "also":
        return ("Communication", "Procedure")
    if kind == "contact" and contact_procedures == "instead":
        return ("Procedure",)
    return UNIT_RESOURCE_TYPES.get(kind, ())


def _sha(*parts: Any) -> str:
    """Each part after a unit separator (None as empty), hashed: one string, one encode (called per unit)."""
    text = "\x1f" + "\x1f".join("" if part is None else str(part) for part in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_UNITS_SQL = """
CREATE TABLE IF NOT EXISTS units (
    unit_key TEXT PRIMARY KEY, kind TEXT NOT NULL, source_id TEXT NOT NULL, participant TEXT,
    hash TEXT NOT NULL, voided INTEGER NOT NULL
);
DELETE FROM units;
INSERT INTO units
    SELECT 'program:' || :program, 'program', :program, NULL, sha(:fp, 'program'), 0;
INSERT INTO units
    SELECT 'supporter:' || key, 'supporter', key, NULL, sha(:fp, hash), 0 FROM staged WHERE kind='supporter';
INSERT OR IGNORE INTO units
    SELECT 'cbo:' || json_extract(body,'$.resource_id'), 'cbo', json_extract(body,'$.resource_id'), NULL,
           sha(:fp, json_extract(body,'$.resource_id'), min(json_extract(body,'$.resource_name'))), 0
    FROM staged WHERE kind='referral' AND json_extract(body,'$.resource_id') IS NOT NULL
    GROUP BY json_extract(body,'$.resource_id');
CREATE TEMP TABLE IF NOT EXISTS patient_of AS SELECT key AS participant, '' AS mrn FROM staged WHERE 0;
CREATE INDEX IF NOT EXISTS temp.patient_of_participant ON patient_of(participant);
DELETE FROM patient_of;
INSERT INTO patient_of
    SELECT key, coalesce(json_extract(body,'$.mrn_system'), '') || '|' || json_extract(body,'$.mrn') FROM staged
    WHERE kind='enrollment';
INSERT INTO units
    SELECT s.kind || ':' || s.key, s.kind, s.key, s.participant, sha(:fp, s.hash, p.mrn),
           json_extract(s.body,'$.void')
    FROM staged s JOIN patient_of p ON p.participant = s.participant
    WHERE s.kind IN ('planned_contact','referral');
INSERT INTO units
    SELECT 'contact:' || c.key, 'contact', c.key, c.participant,
           sha(:fp, c.hash, p.mrn,
               (SELECT s.hash FROM staged s WHERE s.kind='supporter' AND s.key=json_extract(c.body,'$.supporter_id')),
               (SELECT group_concat(h, ',') FROM (  -- what the narrative shows of each goal: its words, if not void
                   SELECT json_extract(g.body,'$.description') || '|' || coalesce(json_extract(g.body,'$.void'), 0)
                   AS h FROM json_each(c.body,'$.goal_ids') j
                   JOIN staged g ON g.kind='goal' AND g.key=j.value ORDER BY j.key))),
           json_extract(c.body,'$.void')
    FROM staged c JOIN patient_of p ON p.participant = c.participant WHERE c.kind='contact';
INSERT INTO units
    SELECT 'goal:' || g.key, 'goal', g.key, g.participant,
           sha(:fp, g.hash, p.mrn, (SELECT group_concat(h, ',') FROM (
               SELECT n.hash AS h FROM staged n WHERE +n.kind='goal_note' AND n.participant=g.participant
               AND json_extract(n.body,'$.goal_id')=g.key ORDER BY n.key))),
           json_extract(g.body,'$.void')
    FROM staged g JOIN patient_of p ON p.participant = g.participant WHERE g.kind='goal';
INSERT INTO units
    SELECT 'enrollment:' || e.key, 'enrollment', e.key, e.key,
           sha(:fp, e.hash, (SELECT group_concat(k, ',') FROM (
               -- what the CarePlan lists: the records, who wrote them, which contacts took place (units.py)
               SELECT c.kind || ':' || c.key || ':' || coalesce(json_extract(c.body,'$.void'), 0) || ':'
                      || coalesce(json_extract(c.body,'$.supporter_id'), '') || ':'
                      || coalesce(json_extract(c.body,'$.outcome'), '') || ':'
                      || coalesce(json_extract(c.body,'$.planned_contact_id'), '') || ':'
                      || coalesce(json_extract(c.body,'$.description'), '') AS k  -- a goal's words: the narrative
               FROM staged c WHERE c.participant=e.key
               AND +c.kind IN ('goal','planned_contact','referral','contact') ORDER BY c.kind, c.key)),
               (SELECT s.hash FROM staged s WHERE s.kind='supporter' AND s.key=json_extract(e.body,'$.supporter_id')),
               (SELECT group_concat(m, ',') FROM (  -- the CareTeam: each supporter, since their first contact
                   SELECT json_extract(c.body,'$.supporter_id') || '@' || min(json_extract(c.body,'$.occurred_at'))
                          || '@' || coalesce((SELECT s.hash FROM staged s WHERE s.kind='supporter'
                                              AND s.key=json_extract(c.body,'$.supporter_id')), '') AS m
                   FROM staged c WHERE c.participant=e.key AND +c.kind='contact'
                   AND NOT json_extract(c.body,'$.void') AND json_extract(c.body,'$.outcome') != 'cancelled'
                   GROUP BY json_extract(c.body,'$.supporter_id') ORDER BY 1))),
           0
    FROM staged e WHERE e.kind='enrollment';
"""

_PLAN_SQL = """
CREATE TABLE IF NOT EXISTS plan (
    unit_key TEXT PRIMARY KEY, kind TEXT NOT NULL, source_id TEXT NOT NULL, participant TEXT,
    hash TEXT, action TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS plan_participant ON plan(participant);
DELETE FROM plan;
INSERT INTO plan
    SELECT u.unit_key, u.kind, u.source_id, u.participant, u.hash,
      CASE
        WHEN l.state = :not_permitted AND l.attempt_hash = u.hash THEN 'parked'
        WHEN l.unit_key IS NULL OR l.hash IS NULL THEN
          CASE WHEN l.state = :quarantined AND l.attempt_hash = u.hash THEN 'quarantined' ELSE 'create' END
        WHEN l.hash != u.hash THEN
          CASE WHEN l.state = :quarantined AND l.attempt_hash = u.hash THEN 'quarantined'
               WHEN u.voided AND NOT l.voided THEN 'void' ELSE 'update' END
        WHEN l.state = :sent THEN 'unchanged'
        WHEN l.state = :quarantined AND l.attempt_hash = u.hash THEN 'quarantined'
        ELSE 'retry'
      END
    FROM units u LEFT JOIN ledger.units l ON l.unit_key = u.unit_key;
INSERT INTO plan
    SELECT l.unit_key, l.kind, substr(l.unit_key, instr(l.unit_key, ':') + 1), l.participant, NULL, 'delete'
    FROM ledger.units l
    WHERE l.voided = 0 AND l.hash IS NOT NULL AND l.kind IN (:deletable_kinds)
      AND NOT EXISTS (SELECT 1 FROM units u WHERE u.unit_key = l.unit_key);
UPDATE plan SET action = 'retry'
    WHERE action = 'quarantined' AND participant IN (
        SELECT participant FROM plan WHERE action IN ('create','update','void','delete','retry'));
CREATE TEMP TABLE IF NOT EXISTS refs (unit_key TEXT NOT NULL, ref_key TEXT NOT NULL);
DELETE FROM refs;
CREATE TEMP TABLE IF NOT EXISTS stuck (kind TEXT NOT NULL, source_id TEXT NOT NULL, PRIMARY KEY (kind, source_id));
DELETE FROM stuck;
INSERT INTO stuck SELECT kind, source_id FROM plan WHERE action = 'quarantined';
INSERT INTO refs
    SELECT s.kind || ':' || s.key, 'supporter:' || json_extract(s.body,'$.supporter_id')
    FROM stuck q JOIN staged s ON s.kind = q.kind AND s.key = q.source_id
    WHERE json_extract(s.body,'$.supporter_id') IS NOT NULL;
INSERT INTO refs
    SELECT s.kind || ':' || s.key, 'enrollment:' || s.participant
    FROM stuck q JOIN staged s ON s.kind = q.kind AND s.key = q.source_id
    WHERE s.kind IN ('goal','planned_contact','referral','contact');
INSERT INTO refs
    SELECT 'contact:' || s.key, 'planned_contact:' || json_extract(s.body,'$.planned_contact_id')
    FROM stuck q JOIN staged s ON s.kind = q.kind AND s.key = q.source_id
    WHERE s.kind = 'contact' AND json_extract(s.body,'$.planned_contact_id') IS NOT NULL;
INSERT INTO refs
    SELECT 'contact:' || s.key, 'goal:' || g.value
    FROM stuck q JOIN staged s ON s.kind = q.kind AND s.key = q.source_id, json_each(s.body,'$.goal_ids') g
    WHERE s.kind = 'contact';
INSERT INTO refs
    SELECT 'referral:' || s.key, 'cbo:' || json_extract(s.body,'$.resource_id')
    FROM stuck q JOIN staged s ON s.kind = q.kind AND s.key = q.source_id
    WHERE s.kind = 'referral' AND json_extract(s.body,'$.resource_id') IS NOT NULL;
UPDATE plan SET action = 'retry'
    WHERE action = 'quarantined' AND unit_key IN (
        SELECT r.unit_key FROM refs r
        JOIN ledger.units q ON q.unit_key = r.unit_key
        LEFT JOIN plan w ON w.unit_key = r.ref_key
        LEFT JOIN ledger.units l ON l.unit_key = r.ref_key
        WHERE w.action IN ('create','update','void','delete','retry')
           OR (l.state = :sent AND l.updated_at > q.updated_at));
"""


@dataclass
class Plan:
    """Counts of what a sync would do, per unit kind, per resource type and per participant."""

    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    by_resource_type: dict[str, Counter[str]] = field(default_factory=dict)
    by_participant: dict[str, Counter[str]] = field(default_factory=dict)
    deletions_held: list[str] = field(default_factory=list)  # why some deletions were not planned
    deletions_held_records: int = 0  # how many records' deletions were held back (the metrics' gauge)
    shape_held: list[str] = field(default_factory=list)  # why record kinds were held by the shape guard
    shapes_seen: dict[str, KindShape] = field(default_factory=dict)  # input shapes to remember if the run completes
    # The same units counted as `sync` counts what it writes (created, updated, voided...: sync_count_name)
    reported: Counter[str] = field(default_factory=Counter)
    reported_by_resource_type: dict[str, Counter[str]] = field(default_factory=dict)
    reported_by_participant: dict[str, Counter[str]] = field(default_factory=dict)

    def total(self, action: Act) -> int:
        """Units with this action."""
        return sum(c[action.value] for c in self.by_kind.values())

    def writes(self) -> int:
        """Units that need a write."""
        return sum(self.total(a) for a in WRITE_ACTIONS)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "units": {k: dict(v) for k, v in sorted(self.by_kind.items())},
            "resources": {k: dict(v) for k, v in sorted(self.by_resource_type.items())},
            "participants": {k: dict(v) for k, v in sorted(self.by_participant.items())},
            "totals": {a.value: self.total(a) for a in Act},
            "sync_counts": {name: self.reported.get(name, 0) for name in SYNC_COUNT_NAMES},
            "sync_counts_by_resource_type": {k: {name: v.get(name, 0) for name in SYNC_COUNT_NAMES}
                                             for k, v in sorted(self.reported_by_resource_type.items())},
            "deletions_held": self.deletions_held,
            "shape_held": self.shape_held,
        }


# The counts of `sync` (connector.run.COUNT_NAMES) that the plan can know before anything is sent.
SYNC_COUNT_NAMES = ("created", "updated", "voided", "deleted", "unchanged", "skipped_quarantined", "held",
                    "not_permitted")


def sync_count_name(action: Act, voided: bool, confirmed: bool) -> str:
    """The count `sync` adds a unit to when the write the plan calls ``action`` goes through.

    ``voided``: the source voided the record (sync sends it as entered-in-error and counts it voided, even the
    first time it is sent); ``confirmed``: the ledger holds a confirmed version, so the server has the resource
    and a write is an update (a unit never confirmed is a create, even when retried after a quarantine).
    """
    if action is Act.DELETE:
        return "deleted"
    if action is Act.UNCHANGED:
        return "unchanged"
    if action is Act.QUARANTINED:
        return "skipped_quarantined"
    if action is Act.HELD:
        return "held"
    if action is Act.PARKED:
        return "not_permitted"
    if voided or action is Act.VOID:
        return "voided"
    return "updated" if confirmed else "created"


def mapping_fingerprint(*parts: str) -> str:
    """A fingerprint of everything besides the records that shapes the output (mapping version, settings)."""
    return _sha(*parts)


# Bump when mapping output changes in a way that must re-send everything.
# 2: goals set together carry goal-acceptance; essential elements derived from the data; change-set Provenance
# on every bundle, voids included.
# 3: issue 19 clinical semantics: participant-declined referrals, one Provenance per author, recorded status dates
# only, specific referral codes, the care team from the contacts, SDOHCC Task elements.
# Also in 3: a narrative (text) on every resource; a contact's hash covers its supporter and the goals it discussed
# (named and quoted in its narrative), the fingerprint the program's time zone (narrative times are stated in it).
# 4: peersync's codes under https://peersync.github.io/fhir (versioned package); CarePlan custodian, contributors,
# outcomes and addressed Conditions (MCC eCare Plan); standard codes beside ours; contacts as Procedures (optional).
# 5: referral codes only as specific as is true (per resource in the profile, a need-level code only where true
# for every referral of the need); participant refusals coded SNOMED 1296859006 "Procedure declined".
MAPPING_VERSION = "5"


def program_fingerprint(ctx: MappingContext) -> str:
    """The mapping fingerprint of a deployment: a change re-sends everything (conditionally: no duplicates)."""
    return mapping_fingerprint(MAPPING_VERSION, ctx.program_id, ctx.program_name, ctx.base_url, ctx.mrn_system,
                               ctx.terminology_base, ctx.program_phone or "", ctx.timezone,
                               *("|".join(code) for code in ctx.referral_codes),
                               *("resource|" + "|".join(code) for code in ctx.referral_resource_codes),
                               ctx.contact_procedures,
                               ctx.referral_tasks, *ctx.directory.fingerprint_parts())


def compute_plan(staging: Staging, ledger: Ledger, *, program_id: str, fingerprint: str,
                 max_delete_fraction: float = 0.2, held_kinds: Collection[str] = (),
                 ctx: MappingContext | None = None) -> Plan:
    """Fill the staging DB's ``units`` and ``plan`` tables and return the counts.

    Deletions are held back (not planned) for a kind when rows of that kind were rejected without a readable
    id, or when more than ``max_delete_fraction`` of the kind's confirmed units would be voided (a missing or
    truncated input file must never void a program's history). Units of ``held_kinds`` (the shape guard's)
    are neither updated, voided nor deleted: those actions become ``held``; creates and retries of content
    the server already confirmed go ahead.

    ``ctx`` brings the clinical-note mode (``ctx.clinical_notes``): with "also" or "only" every participant gets a
    ``note`` unit per period; with "only" its structured units (and the community organizations only they name)
    are left out. Kinds a mode does not write are never deleted: switching modes leaves what the server has.
    Its ``contact_procedures`` only shapes the counts per resource type.
    """
    db = staging.db
    db.create_function("sha", -1, _sha, deterministic=True)
    _attach(db, ledger)
    staging.flush()
    mode = ctx.clinical_notes if ctx is not None else "off"
    contact_procedures = ctx.contact_procedures if ctx is not None else "off"
    deletable = (STRUCTURED_KINDS if mode != "only" else ()) + ((NOTE_KIND,) if mode != "off" else ())
    with db:
        for statement in _split(_UNITS_SQL):
            db.execute(statement, {"program": program_id, "fp": fingerprint})
        if ctx is not None and not ctx.directory.writes_supporters:  # the EHR's own Practitioners, no roles
            db.execute("DELETE FROM units WHERE kind='supporter'")
        if ctx is not None and mode != "off":
            _add_note_units(db, staging, ctx, fingerprint, structured=mode == "also")
        for statement in _split(_PLAN_SQL):
            statement = statement.replace(":deletable_kinds", ",".join(f"'{k}'" for k in deletable) or "NULL")
            db.execute(statement, {"sent": UnitState.SENT, "quarantined": UnitState.QUARANTINED,
                                   "not_permitted": UnitState.NOT_PERMITTED})
    plan = Plan()
    plan.deletions_held, plan.deletions_held_records = _hold_unsafe_deletions(db, staging, max_delete_fraction)
    if held_kinds:
        kinds = sorted(held_kinds)
        with db:
            db.execute(f"UPDATE plan SET action=? WHERE action IN (?,?,?) AND kind IN ({','.join('?' * len(kinds))})",
                       (Act.HELD, Act.UPDATE, Act.VOID, Act.DELETE, *kinds))
    for kind, participant, action, voided, confirmed, count in db.execute(
        """SELECT p.kind, p.participant, p.action, coalesce(u.voided, 0), l.hash IS NOT NULL, count(*) FROM plan p
           LEFT JOIN units u ON u.unit_key = p.unit_key LEFT JOIN ledger.units l ON l.unit_key = p.unit_key
           GROUP BY 1, 2, 3, 4, 5"""
    ):
        reported = sync_count_name(Act(action), bool(voided), bool(confirmed))
        plan.by_kind.setdefault(kind, Counter())[action] += count
        plan.reported[reported] += count
        for resource_type in unit_resource_types(kind, contact_procedures):
            plan.by_resource_type.setdefault(resource_type, Counter())[action] += count
            plan.reported_by_resource_type.setdefault(resource_type, Counter())[reported] += count
        if participant is not None:
            plan.by_participant.setdefault(participant, Counter())[action] += count
            plan.reported_by_participant.setdefault(participant, Counter())[reported] += count
    return plan


def _add_note_units(db: sqlite3.Connection, staging: Staging, ctx: MappingContext, fingerprint: str, *,
                    structured: bool) -> None:
    """Insert a ``note`` unit per participant per period; its hash covers every record the note renders."""
    rows = []
    for participant, mrn in db.execute("SELECT participant, mrn FROM patient_of ORDER BY participant").fetchall():
        for note in participant_notes(staging, participant, ctx):
            unit_hash = _sha(fingerprint, "note", ctx.note_period, ctx.timezone, mrn,
                             *(f"{r.kind}:{r.key}:{record_hash(r)}" for r in note.records()))
            rows.append((f"{NOTE_KIND}:{note.source_id}", NOTE_KIND, note.source_id, participant, unit_hash,
                         int(note.voided)))
    db.executemany("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?)", rows)
    # A note whose contacts are all voided and that the clinic never received is not sent: an entered-in-error
    # document nobody saw would only add a withdrawn note to the chart.
    db.execute(f"DELETE FROM units WHERE kind = '{NOTE_KIND}' AND voided = 1 AND unit_key NOT IN "
               "(SELECT unit_key FROM ledger.units WHERE hash IS NOT NULL)")
    if not structured:
        kinds = (*STRUCTURED_KINDS, "cbo")
        db.execute(f"DELETE FROM units WHERE kind IN ({','.join('?' * len(kinds))})", kinds)


def _hold_unsafe_deletions(db: sqlite3.Connection, staging: Staging, max_fraction: float) -> tuple[list[str], int]:
    """Take unsafe deletions out of the plan: why (PHI-free lines) and how many records."""
    held: list[str] = []
    records = 0
    rejected_known, rejected_unknown = staging.rejected_keys()
    with db:
        for kind, key in rejected_known:
            db.execute("DELETE FROM plan WHERE action='delete' AND unit_key=?", (f"{kind}:{key}",))
        for kind in rejected_unknown:
            n = db.execute("DELETE FROM plan WHERE action='delete' AND kind=?", (kind,)).rowcount
            if n:
                records += n
                held.append(f"{n} {kind} deletion(s) held: some {kind} rows were rejected without a readable id")
        for kind, deletes, confirmed in db.execute(
            """SELECT p.kind, count(*), (SELECT count(*) FROM ledger.units l WHERE l.kind=p.kind AND l.hash IS NOT NULL)
               FROM plan p WHERE p.action='delete' GROUP BY p.kind"""
        ).fetchall():
            if confirmed and deletes / confirmed > max_fraction:
                db.execute("DELETE FROM plan WHERE action='delete' AND kind=?", (kind,))
                records += deletes
                held.append(
                    f"{deletes} of {confirmed} {kind} records are missing from the input: more than "
                    f"{max_fraction:.0%}, so none were voided (check the input files; raise sync.max_delete_fraction "
                    "if this is intended)"
                )
    return held, records


def participants_to_write(staging: Staging) -> list[str]:
    """Participants with at least one unit to write, in input order."""
    return [
        row[0]
        for row in staging.db.execute(
            f"""SELECT participant FROM plan WHERE participant IS NOT NULL AND action IN ({_in(WRITE_ACTIONS)})
                GROUP BY participant ORDER BY min(rowid)"""
        )
    ]


class PlannedUnit(NamedTuple):
    """One unit the plan says to write, as the writer and ``peersync map`` receive it."""

    unit_key: str  # "kind:source_id"
    kind: str
    source_id: str
    unit_hash: str | None  # None for a deletion (the record is gone from the input)
    action: Act


def units_to_write(staging: Staging, participant: str | None) -> list[PlannedUnit]:
    """A participant's units to write, in plan order (``participant`` None: the program-wide units)."""
    where = "participant IS NULL" if participant is None else "participant = ?"
    args = () if participant is None else (participant,)
    rows = staging.db.execute(
        f"SELECT unit_key, kind, source_id, hash, action FROM plan WHERE {where} AND action IN ({_in(WRITE_ACTIONS)}) "
        "ORDER BY rowid",
        args,
    )
    return [PlannedUnit(unit_key, kind, source_id, unit_hash, Act(action))
            for unit_key, kind, source_id, unit_hash, action in rows]


def source_ids_to_write(staging: Staging, kind: str) -> list[str]:
    """The source ids of one kind's units this run creates or updates (not voids or deletions)."""
    rows = staging.db.execute(
        f"SELECT source_id FROM plan WHERE kind = ? AND action IN ({_in(WRITE_ACTIONS - {Act.DELETE, Act.VOID})}) "
        "ORDER BY rowid", (kind,))
    return [source_id for (source_id,) in rows]


def _in(actions: frozenset[Act]) -> str:
    return ",".join(f"'{a.value}'" for a in sorted(actions))


def _attach(db: sqlite3.Connection, ledger: Ledger) -> None:
    attached = {row[1] for row in db.execute("PRAGMA database_list")}
    if "ledger" not in attached:
        ledger.attach_to(db)


def _split(script: str) -> list[str]:
    return [s.strip() for s in script.split(";\n") if s.strip()]


def retried_units(staging: Staging) -> int:
    """Units this run writes that an earlier run left unconfirmed: pending, quarantined or in review.

    Counted from the plan joined with the ledger (attached by the planner): units in review have no confirmed
    hash, so the plan calls them 'create' rather than 'retry'.
    """
    writes = ",".join(f"'{a.value}'" for a in sorted(WRITE_ACTIONS))
    return int(staging.db.execute(
        f"SELECT count(*) FROM plan p JOIN ledger.units l ON l.unit_key = p.unit_key "
        f"WHERE p.action IN ({writes}) AND l.state != ?", (UnitState.SENT,)).fetchone()[0])


def review_candidates(staging: Staging, open_subjects: Collection[str]) -> dict[str, int]:
    """Units the plan writes that an open review entry names, by the entry's reason, as far as the ledger knows
    offline: a participant whose Patient was not found (or was ambiguous) goes to review again unless the EHR
    now has it; a record duplicated on the server stays in review until a person resolves it.

    ``open_subjects``: the ledger's open review subjects (``participant:{id}`` or a unit key). Returns units per
    kind of subject (``participant``, ``record``), only those with any.
    """
    if not open_subjects:
        return {}
    db = staging.db
    with db:
        db.execute("CREATE TEMP TABLE IF NOT EXISTS review_subjects (subject TEXT PRIMARY KEY)")
        db.execute("DELETE FROM review_subjects")
        db.executemany("INSERT OR IGNORE INTO review_subjects VALUES (?)", ((s,) for s in open_subjects))
    writes = _in(WRITE_ACTIONS)
    participant_units, record_units = db.execute(
        f"""SELECT
              sum(EXISTS (SELECT 1 FROM review_subjects r WHERE r.subject = 'participant:' || p.participant)),
              sum(EXISTS (SELECT 1 FROM review_subjects r WHERE r.subject = p.unit_key))
            FROM plan p WHERE p.action IN ({writes})""").fetchone()
    found = {"participant": participant_units or 0, "record": record_units or 0}
    return {name: count for name, count in found.items() if count}
