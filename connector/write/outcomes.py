"""A CarePlan's outcome links to contacts that could not be written (decided purely; used by the writer).

The CarePlan lists each contact that took place in ``activity.outcomeReference`` (MCC eCare Plan). A contact the
server refused (quarantined) never lands, so a CarePlan that still names it can never land either, and every record
of the participant that points at the CarePlan would wait with it. When a participant's deferred units are sent a
last time, outcome links to contacts that are neither in that batch nor known to the ledger are dropped; the unit is
then recorded without the plan's hash, so the next run sends the full CarePlan again (and links the contact once it
has landed).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from connector.identifiers import parse_conditional_reference

Identity = tuple[str, str, str]


def without_unknown_outcomes(careplan: dict[str, Any],
                             known: Callable[[Identity], bool]) -> tuple[dict[str, Any], int]:
    """A copy of the CarePlan without outcome links whose target is not ``known``, and how many were dropped.

    An activity left with nothing (one that only held outcomes) is dropped too."""
    out = copy.deepcopy(careplan)
    dropped = 0
    activities = []
    for activity in out.get("activity", []):
        kept = []
        for ref in activity.get("outcomeReference", []):
            identity = parse_conditional_reference(ref.get("reference", ""))
            if identity is None or known(identity):
                kept.append(ref)
            else:
                dropped += 1
        if kept:
            activity["outcomeReference"] = kept
        else:
            activity.pop("outcomeReference", None)
        if activity:
            activities.append(activity)
    if activities:
        out["activity"] = activities
    else:
        out.pop("activity", None)
    return out, dropped
