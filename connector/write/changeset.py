"""Change-sets: the transaction a sync sends (and ``peersync map`` writes) for a group of units, with a Provenance
per author who wrote its resources.

Every Provenance peersync posts carries a change-set tag in ``meta.tag`` and is a conditional create on that
tag (``ifNoneExist: _tag=...``): a replay of the same change-set (a lost response, a crash between the server's
commit and the ledger write, a lost ledger) finds the first Provenance instead of adding another. The rule is
written here once, for the units' transactions and for voids alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Literal

from connector.identifiers import token_query
from connector.map import MappingContext, map_provenance, resource_authors
from connector.map.narrative import SUPERSEDED_NOTICE, mark_entered_in_error
from connector.write.bundle import (
    BuiltBundle,
    BundledResource,
    Identity,
    PendingWrite,
    build_transaction,
)

# Where each resource type keeps the status that entered-in-error goes into.
STATUS_ELEMENT = {
    "Goal": "lifecycleStatus",
    "CarePlan": "status",
    "CareTeam": "status",
    "Communication": "status",
    "CommunicationRequest": "status",
    "ServiceRequest": "status",
    "Task": "status",
    "DocumentReference": "status",
}


def change_set_code(parts: Iterable[str]) -> str:
    """The change-set code of a set of parts (order does not matter): the same parts, the same code."""
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:32]


def units_change_set(writes: Iterable[PendingWrite]) -> str:
    """The change-set code of a group of units: their keys and hashes (a changed unit is a new change-set)."""
    return change_set_code(f"{w.unit.unit_key}={w.unit_hash}" for w in writes)


def void_change_set(unit_key: str, references: Iterable[str]) -> str:
    """The change-set code of voiding a unit's resources (``Type/id`` references)."""
    return change_set_code([unit_key, "void", *references])


def change_set_tag_system(ctx: MappingContext) -> str:
    """The ``meta.tag`` system of this program's change-set codes."""
    return f"{ctx.meta_source}/change-set"


def provenance_condition(ctx: MappingContext, code: str) -> str:
    """The ``ifNoneExist`` that finds an earlier Provenance of the same change-set."""
    return f"_tag={token_query(change_set_tag_system(ctx), code)}"


def change_set_provenance(targets: Sequence[str], *, code: str, activity: Literal["CREATE", "UPDATE", "NULLIFY"],
                          author: str | None, recorded: datetime, ctx: MappingContext) -> dict[str, Any]:
    """The Provenance of a change-set over ``targets``, tagged with its change-set code."""
    prov = map_provenance(targets, activity=activity, author=author, recorded=recorded, ctx=ctx)
    prov.setdefault("meta", {}).setdefault("tag", []).append({"system": change_set_tag_system(ctx), "code": code})
    return prov


Activity = Literal["CREATE", "UPDATE", "NULLIFY"]


def provenance_groups(bundled: Sequence[BundledResource], writes: Sequence[PendingWrite],
                      ctx: MappingContext) -> list[tuple[str | None, Activity, list[str]]]:
    """(author, activity, target fullUrls) for each Provenance of a change-set, in a stable order.

    One per author who wrote a target (:func:`~connector.map.resource_authors`; None: the program Organization,
    for targets that name no supporter) and per activity: NULLIFY for a voided unit, CREATE for a unit's first
    send, UPDATE after. A target written by two supporters is in both their Provenances.
    """
    by_unit = {w.unit.unit_key: w for w in writes}
    groups: dict[tuple[str | None, Activity], list[str]] = {}
    for entry in bundled:
        write = by_unit[entry.unit_key]
        activity: Activity = "NULLIFY" if write.unit.voided else "CREATE" if write.first_send else "UPDATE"
        authors: list[str | None] = [*resource_authors(entry.resource, ctx)] or [None]
        for author in authors:
            groups.setdefault((author, activity), []).append(entry.full_url)
    return [(author, activity, targets) for (author, activity), targets in
            sorted(groups.items(), key=lambda g: (g[0][0] or "", g[0][1]))]


def build_change_set(writes: Sequence[PendingWrite], *, ctx: MappingContext, patient: tuple[Identity, str] | None,
                     resolve: Callable[[Identity], str | None], recorded: datetime,
                     conditional_provenance: bool = True) -> BuiltBundle:
    """The transaction for a group of units: their conditional updates, then one Provenance per author and
    activity (:func:`provenance_groups`), each tagged with its own change-set code.

    ``patient`` and ``resolve`` say how references are rewritten (see :func:`build_transaction`); ``map`` passes
    no Patient and resolves nothing, so its references stay conditional. ``conditional_provenance`` is False
    only for a server that declares it cannot do a conditional create on Provenance.
    """
    units_code = units_change_set(writes)

    def provenances(bundled: list[BundledResource]) -> list[tuple[dict[str, Any], str | None]]:
        out = []
        for author, activity, targets in provenance_groups(bundled, writes, ctx):
            # one tag per author and activity: a replay finds each Provenance again, none is merged with another
            code = change_set_code([units_code, author or "program", activity])
            prov = change_set_provenance(targets, code=code, activity=activity, author=author, recorded=recorded,
                                         ctx=ctx)
            out.append((prov, provenance_condition(ctx, code) if conditional_provenance else None))
        return out

    return build_transaction([w.unit for w in writes], patient=patient, resolve=resolve, provenances=provenances)


def void_bundle(unit_key: str, current: Sequence[dict[str, Any]], *, ctx: MappingContext, recorded: datetime,
                conditional_provenance: bool = True, superseded: bool = False) -> dict[str, Any] | None:
    """The transaction that marks a unit's resources entered-in-error (``current``: as read from the server),
    with a NULLIFY Provenance of the void's change-set. None when no resource has a status to set.
    ``superseded``: a clinical note replaced by other notes (connector.map.note.replaced) is set ``superseded``
    instead: it was not wrong (FHIR R4 document-reference-status)."""
    entries: list[dict[str, Any]] = []
    for resource in current:
        resource_type = resource["resourceType"]
        if resource_type not in STATUS_ELEMENT:
            continue
        voided = {k: v for k, v in resource.items() if k != "meta"}  # the server sets meta; ours would conflict
        if superseded and resource_type == "DocumentReference":
            voided["status"] = "superseded"
            voided["text"] = mark_entered_in_error(resource.get("text"), SUPERSEDED_NOTICE)
        else:
            voided[STATUS_ELEMENT[resource_type]] = "entered-in-error"
            voided["text"] = mark_entered_in_error(resource.get("text"))
        entries.append({"resource": voided, "request": {"method": "PUT", "url": f"{resource_type}/{resource['id']}"}})
    if not entries:
        return None
    targets = [e["request"]["url"] for e in entries]
    code = void_change_set(unit_key, targets)
    request = {"method": "POST", "url": "Provenance"}
    if conditional_provenance:
        request["ifNoneExist"] = provenance_condition(ctx, code)
    prov = change_set_provenance(targets, code=code, activity="NULLIFY", author=None, recorded=recorded, ctx=ctx)
    entries.append({"resource": prov, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
