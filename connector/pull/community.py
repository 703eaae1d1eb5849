"""Community referrals back to the program: the status community organizations set on the referral Tasks that
peersync wrote (SDOH Clinical Care: the performer moves the Task through accepted, in-progress, completed, or
rejected/cancelled, with ``statusReason`` and ``output``).

The rule for who wins (docs/care-coordination.md): once the organization has changed a Task (a version peersync
did not write), its status, ``statusReason``, ``businessStatus`` and ``output`` are the organization's, for good.
The ledger records that change (``organization_changes``: referral, version, status), so the version a later sync
writes while keeping those elements (``connector.map.requests.keep_organization_fields``) is still the
organization's status: a program export never rolls back what the organization set, however often the program
edits the row. The program's own statuses apply until the organization has said anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ReferralStatus:
    """A referral's status as the server holds it. ``status_reason`` and ``outputs`` come from the organization
    and may hold free text: the referrals report is written 0600 and none of it is logged."""

    referral_id: str
    task_id: str
    version: str
    status: str
    changed_at: str
    changed_by: str  # "organization" (a version peersync did not write) or "program"
    status_reason: str
    business_status: str
    outputs: tuple[str, ...]
    task: Mapping[str, Any]

    def as_row(self) -> dict[str, Any]:
        """The report row (without the Task itself)."""
        row = asdict(self)
        row.pop("task")
        row["outputs"] = " ".join(self.outputs)
        return row


def _text(concept: Mapping[str, Any] | None) -> str:
    concept = concept or {}
    return str(concept.get("text") or next((c.get("display") or c.get("code") for c in concept.get("coding", [])
                                            if c.get("display") or c.get("code")), "") or "")


def _output_value(output: Mapping[str, Any]) -> str:
    for key, value in output.items():
        if key.startswith("value"):
            if isinstance(value, dict):
                return str(value.get("reference") or value.get("display") or _text(value))
            return str(value)
    return ""


def referral_status(task: Mapping[str, Any], *, referral_system: str, written_versions: set[str],
                    organization_changed: bool = False) -> ReferralStatus | None:
    """The status of one of our referral Tasks (None when it carries no referral identifier of this program).

    ``written_versions`` are the versions peersync itself confirmed for this Task (from the ledger): any other
    version was written by someone else, the organization or its platform. ``organization_changed``: the ledger
    remembers that the organization changed this Task before; its status stays the organization's even in a
    version peersync wrote afterwards (peersync re-sent the Task keeping the organization's elements).
    """
    referral_id = next((str(i["value"]) for i in task.get("identifier", [])
                        if i.get("system") == referral_system and i.get("value")), None)
    if referral_id is None:
        return None
    meta = task.get("meta") or {}
    version = str(meta.get("versionId", ""))
    by_program = version in written_versions and not organization_changed
    return ReferralStatus(
        referral_id=referral_id,
        task_id=str(task.get("id", "")),
        version=version,
        status=str(task.get("status", "")),
        changed_at=str(task.get("lastModified") or meta.get("lastUpdated") or ""),
        changed_by="program" if by_program else "organization",
        status_reason=_text(task.get("statusReason")),
        business_status=_text(task.get("businessStatus")),
        outputs=tuple(v for v in (_output_value(o) for o in task.get("output", [])) if v),
        task=task,
    )
