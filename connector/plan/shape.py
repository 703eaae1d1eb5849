"""The shape guard: hold a record kind whose input lost a column or most of its rows since the last good run.

An export whose `notes` column was renamed or dropped reads as "every note is now empty": without the guard
the next sync would update every Communication without its note. The ledger remembers, per record kind, the
profile's columns the input had and how many rows it read at the last run that completed; when a remembered
column is missing now, or the row count fell by more than ``max_row_drop_fraction``, the kind is *held*:
none of its records (nor the records built from them, see HELD_WITH) is updated or voided until the input is
fixed or an operator accepts the new shape (``peersync sync --accept-shape-change``). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class KindShape:
    """What the input of one record kind looked like: the profile's columns present, and the rows read."""

    columns: frozenset[str]
    rows: int


# Unit kinds whose resources also carry what a record kind holds: a goal's notes are in its Goal; an
# enrollment's CarePlan lists its goals, planned contacts and referrals, its CareTeam the supporters; a
# referral names its community organization.
# A clinical note (clinical-note mode) renders its contacts, goals and their notes, referrals, planned contacts
# and supporters.
HELD_WITH: dict[str, tuple[str, ...]] = {
    "goal_note": ("goal", "note"),
    "goal": ("enrollment", "note"),
    "planned_contact": ("enrollment", "note"),
    "referral": ("enrollment", "cbo", "note"),
    "supporter": ("enrollment", "note"),
    "contact": ("enrollment", "note"),  # the CareTeam lists every supporter who worked with the participant
}


def shape_changes(previous: Mapping[str, KindShape], current: Mapping[str, KindShape],
                  mapped: Mapping[str, Iterable[str]], *, max_row_drop_fraction: float) -> dict[str, str]:
    """Record kind -> why it is held, for each kind whose shape changed for the worse since ``previous``.

    Only columns the profile still reads count (a column dropped from the profile on purpose is no change);
    a kind the profile no longer reads is ignored.
    """
    changes: dict[str, str] = {}
    for kind, before in sorted(previous.items()):
        if kind not in mapped:
            continue
        now = current.get(kind, KindShape(frozenset(), 0))
        reasons = []
        gone = sorted((before.columns & set(mapped[kind])) - now.columns)
        if gone:
            names = ", ".join(repr(c) for c in gone)
            reasons.append(f"column{'s' if len(gone) > 1 else ''} {names} {'are' if len(gone) > 1 else 'is'} "
                           "missing from the input (present at the last completed run)")
        if before.rows and (before.rows - now.rows) / before.rows > max_row_drop_fraction:
            reasons.append(f"{now.rows} rows read, {before.rows} at the last completed run (a drop of more than "
                           f"{max_row_drop_fraction:.0%})")
        if reasons:
            changes[kind] = (f"{kind} held: {'; '.join(reasons)}. None of its records were updated or voided. "
                             "Fix the export, or if the change is intended run "
                             "`peersync sync --accept-shape-change`")
    return changes


def held_unit_kinds(kinds: Iterable[str]) -> set[str]:
    """The unit kinds to hold for held record kinds: the kinds themselves and those built from them."""
    held: set[str] = set()
    for kind in kinds:
        held.add(kind)
        held.update(HELD_WITH.get(kind, ()))
    return held


def current_shapes(present: Mapping[str, Iterable[str]], rows: Mapping[str, int]) -> dict[str, KindShape]:
    """The shapes of one run's input, from the read report's present columns and rows per kind."""
    return {kind: KindShape(frozenset(columns), int(rows.get(kind, 0))) for kind, columns in present.items()}
