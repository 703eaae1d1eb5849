"""The write stage's decisions, as pure functions (no I/O, no clock): each is unit-tested alone.

* how a group of units is cut into transactions (:func:`chunk_writes`, used by sync and by ``peersync map``);
* what to do after a transaction fails (:func:`step_after_failure`, :func:`halves`,
  :func:`is_unresolved_reference`);
* how each resource type is written on this server (:func:`write_plan`, from its CapabilityStatement);
* which write strategy a run uses (:func:`choose_strategy`) and the ids update-as-create assigns
  (:func:`deterministic_id`);
* the order that never sends a referrer before its target (:func:`reference_order`, :func:`resource_order`,
  :func:`request_waves`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from connector.identifiers import parse_conditional_reference, reference_strings
from connector.server.capabilities import Capabilities
from connector.server.client import Action
from connector.server.hapi import UNRESOLVED_REFERENCE_CODES
from connector.write.bundle import Identity, PendingWrite, UnitWrite, identity_of

T = TypeVar("T")


def chunk_writes(writes: Iterable[PendingWrite], max_entries: int) -> Iterator[list[PendingWrite]]:
    """Cut units, in order, into groups of at most ``max_entries`` resources (plus the Provenance each
    transaction adds). A unit is never split: one larger than the limit travels alone. Lazy, so a
    participant's units are mapped only as their transaction is built."""
    chunk: list[PendingWrite] = []
    size = 0
    for write in writes:
        if chunk and size + write.size > max_entries:
            yield chunk
            chunk, size = [], 0
        chunk.append(write)
        size += write.size
    if chunk:
        yield chunk


def halves(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """The two halves a rejected transaction is split into (the first half is the smaller one)."""
    middle = len(items) // 2
    return list(items[:middle]), list(items[middle:])


class FailureStep(StrEnum):
    """What the writer does after a transaction failed."""

    SPLIT = "split"  # send each half on its own, to find the units at fault
    DEFER = "defer"  # send again after the participant's other units have landed
    RECORD = "record"  # record the units' state (quarantined, in review, pending); the run goes on
    STOP = "stop"  # record the units' state, then end the run: the server cannot take these writes at all


# Failures that one unit's content (or a duplicate on the server) can cause: splitting finds the unit.
_ISOLATING = frozenset({Action.ISOLATE, Action.REVIEW, Action.CONFLICT})


def is_unresolved_reference(status: int, outcome_text: str) -> bool:
    """The server could not resolve a reference (a 404, or HAPI's conditional or literal reference codes)."""
    return status == 404 or any(code in outcome_text for code in UNRESOLVED_REFERENCE_CODES)


def step_after_failure(action: Action, *, units: int, unresolved_reference: bool, can_defer: bool) -> FailureStep:
    """The next step after a transaction of ``units`` units failed with ``action``.

    A single unit whose only fault is a reference to something not yet written is deferred, not quarantined,
    when the caller still has a later pass (``can_defer``): its target may land later in the same run.
    """
    if action in _ISOLATING and units > 1:
        return FailureStep.SPLIT
    if can_defer and unresolved_reference:
        return FailureStep.DEFER
    if action is Action.FATAL:
        return FailureStep.STOP
    return FailureStep.RECORD


@dataclass(frozen=True)
class WritePlan:
    """How this run writes each resource type."""

    conditional_types: frozenset[str] | None = None  # None: conditional update for every type
    provenance_conditional_create: bool = True
    search_types: tuple[str, ...] = ()  # written types that fall back to search-then-write (sorted)
    transaction_declared: bool = True  # False: the statement lists system interactions, but not transaction

    def uses_conditional(self, resource_type: str) -> bool:
        """Whether a type is written as ``PUT Type?identifier=...`` (else: search, then PUT by id or POST)."""
        return self.conditional_types is None or resource_type in self.conditional_types


CONDITIONAL_EVERYWHERE = WritePlan()


def write_plan(write_mode: str, capabilities: Capabilities | None, written_types: Iterable[str]) -> WritePlan:
    """The write plan for ``server.write_mode`` and the server's capabilities.

    ``conditional`` (or no readable CapabilityStatement) trusts the standard conditional update everywhere: a
    server that lacks it rejects the writes, and those records are quarantined or left pending with the reason.
    ``auto`` uses conditional update where the server declares it and search-then-write elsewhere; ``search``
    uses search-then-write everywhere. A Provenance is a conditional create unless the server says it cannot.
    """
    if write_mode == "conditional" or capabilities is None:
        return CONDITIONAL_EVERYWHERE
    types = capabilities.conditional_update_types() if write_mode == "auto" else frozenset()
    return WritePlan(
        conditional_types=types,
        provenance_conditional_create=capabilities.conditional_create("Provenance"),
        search_types=tuple(sorted(set(written_types) - types)),
        transaction_declared=capabilities.supports_transaction or not capabilities.system_interactions,
    )


# -- write strategies ----------------------------------------------------------------------------------

class Strategy(StrEnum):
    """How change-sets travel to the server (``server.write_strategy``)."""

    TRANSACTION = "transaction"  # one transaction per chunk; the server resolves conditional references
    BATCH = "batch"  # batch Bundles of independent entries, in reference order; peersync resolves references
    SINGLE = "single"  # one request per resource, in reference order; peersync resolves references
    UPDATE_AS_CREATE = "update-as-create"  # PUT Type/{deterministic id}, one request per resource


@dataclass(frozen=True)
class StrategyChoice:
    """The strategy a run uses, why (one PHI-free line for doctor, plan and the log), and who resolves
    references: the server inside a transaction, or peersync (literal ``Type/id`` of resources it knows)."""

    strategy: Strategy
    reason: str
    peersync_resolves_references: bool


def choose_strategy(configured: str, capabilities: Capabilities | None, *,
                    resolves_conditional_references: bool | None = None,
                    written_types: Iterable[str] = ()) -> StrategyChoice:
    """The write strategy for ``server.write_strategy`` and the server's CapabilityStatement.

    ``auto`` picks transaction when the server declares it (or declares no system interactions at all, or its
    statement cannot be read: the standard's default), else batch when declared, else single. update-as-create
    is never picked automatically: it puts ids into the server's id space, which only the operator can agree to
    (and a server that already holds peersync's resources under server-assigned ids would get a second copy
    when the ledger is lost). ``resolves_conditional_references`` (None: yes for a transaction) says whether the
    server resolves ``Type?identifier=`` references inside a transaction; when not, peersync resolves them.
    """
    if configured != "auto":
        strategy = Strategy(configured)
        reason = f"server.write_strategy = {configured}"
        missing = sorted(set(written_types) - capabilities.update_create_types()) if capabilities else []
        if strategy is Strategy.UPDATE_AS_CREATE and missing:
            reason += f" (no updateCreate declared for {', '.join(missing)}: the server may refuse client ids)"
    elif capabilities is None:
        strategy, reason = Strategy.TRANSACTION, "auto: no readable CapabilityStatement, assuming transaction"
    elif capabilities.supports_transaction or not capabilities.system_interactions:
        strategy = Strategy.TRANSACTION
        reason = "auto: the server declares transaction" if capabilities.supports_transaction else \
            "auto: the CapabilityStatement lists no system interactions, assuming transaction"
    elif capabilities.supports_batch:
        strategy, reason = Strategy.BATCH, "auto: the server declares batch but not transaction"
    else:
        strategy, reason = Strategy.SINGLE, "auto: the server declares neither transaction nor batch"
    if strategy is Strategy.TRANSACTION:
        peersync_resolves = resolves_conditional_references is False
        if peersync_resolves:
            reason += "; server.resolves_conditional_references = false: peersync resolves references"
    else:
        peersync_resolves = True
    return StrategyChoice(strategy, reason, peersync_resolves)


def deterministic_id(resource_type: str, system: str, value: str) -> str:
    """The server id update-as-create uses for a business identifier: stable across runs and machines, and a
    valid FHIR id ([A-Za-z0-9.-]{1,64}). "ps" then 48 hex digits (192 bits) of SHA-256 over type|system|value:
    never all digits (HAPI refuses numeric client ids), and a collision needs about 2^96 resources."""
    digest = hashlib.sha256(f"{resource_type}|{system}|{value}".encode()).hexdigest()
    return "ps" + digest[:48]


# -- reference order -----------------------------------------------------------------------------------

# References that may be left out of a first write and added by a second one: they close a cycle (a CarePlan
# lists its activities, which point back at it with basedOn). (resource type, top-level element).
DEFERRABLE_REFERENCES = frozenset({("CarePlan", "activity")})


_DEFERRING_TYPES = frozenset(t for t, _element in DEFERRABLE_REFERENCES)


def references_of(resource: dict[str, Any]) -> list[tuple[Identity, bool]]:
    """(target identity, deferrable) of every conditional reference in a resource, in document order."""
    found: list[tuple[Identity, bool]] = []
    resource_type = resource.get("resourceType", "")
    for element, value in resource.items():
        deferrable = (resource_type, element) in DEFERRABLE_REFERENCES
        for reference in reference_strings(value):
            target = parse_conditional_reference(reference)
            if target is not None:
                found.append((target, deferrable))
    return found


def without_references(resource: dict[str, Any], targets: set[Identity]) -> dict[str, Any]:
    """A copy of a resource without the items of its deferrable elements that reference one of ``targets``."""
    out = dict(resource)
    for element in [e for t, e in DEFERRABLE_REFERENCES if t == resource.get("resourceType")]:
        items = resource.get(element)
        if isinstance(items, list):
            kept = [item for item in items if not any(parse_conditional_reference(ref) in targets
                                                      for ref in reference_strings(item))]
            if kept:
                out[element] = kept
            else:
                out.pop(element, None)
    return out


def strip_deferrable(units: Sequence[PendingWrite], written: Callable[[Identity], bool]
                     ) -> tuple[list[PendingWrite], dict[str, PendingWrite]]:
    """The units to send, each deferrable reference (a CarePlan's activities) to a resource not ``written`` left
    out; and, by unit key, the complete units of those sent incomplete: they go again once their targets have
    landed (a cycle, CarePlan <-> its requests, cannot be written in one step outside one transaction)."""
    out: list[PendingWrite] = []
    incomplete: dict[str, PendingWrite] = {}
    for write in units:
        missing = {target for r in write.unit.resources if r.get("resourceType") in _DEFERRING_TYPES
                   for target, deferrable in references_of(r) if deferrable and not written(target)}
        if not missing:
            out.append(write)
            continue
        unit = write.unit
        stripped = UnitWrite(unit.unit_key, unit.kind, [without_references(r, missing) for r in unit.resources],
                             unit.voided)
        out.append(PendingWrite(stripped, write.unit_hash))
        incomplete[unit.unit_key] = write
    return out, incomplete


def reference_order(writes: Sequence[PendingWrite]) -> list[PendingWrite]:
    """The units in an order where every unit comes after the units holding what it references (deferrable
    references aside), otherwise as given (a stable topological sort). Chunks cut from this order, and the halves
    a rejected chunk is split into (first half first), then never send a referrer before its target. Units in a
    cycle of non-deferrable references (none today) keep their given order."""
    holder: dict[Identity, int] = {}
    for index, write in enumerate(writes):
        for resource in write.unit.resources:
            holder.setdefault(identity_of(resource), index)
    needs: list[set[int]] = []
    for index, write in enumerate(writes):
        targets = {holder[t] for r in write.unit.resources for t, deferrable in references_of(r)
                   if not deferrable and t in holder}
        targets.discard(index)
        needs.append(targets)
    placed: list[int] = []
    done: set[int] = set()
    visiting: set[int] = set()

    def place(index: int) -> None:
        if index in done or index in visiting:
            return  # done, or a cycle: keep the given order
        visiting.add(index)
        for target in sorted(needs[index]):
            place(target)
        visiting.discard(index)
        done.add(index)
        placed.append(index)

    for index in range(len(writes)):
        place(index)
    return [writes[i] for i in placed]


def resource_order(resources: Sequence[dict[str, Any]]) -> list[int]:
    """Positions of a unit's resources with every referenced one first (a ServiceRequest before its Task)."""
    position = {identity_of(r): i for i, r in enumerate(resources)}
    order: list[int] = []

    def place(index: int, path: frozenset[int]) -> None:
        if index in order or index in path:
            return
        for target, deferrable in references_of(resources[index]):
            if not deferrable and target in position:
                place(position[target], path | {index})
        order.append(index)

    for index in range(len(resources)):
        place(index, frozenset())
    return order


def request_waves(targets: Sequence[set[int]], *, one_per_request: bool) -> list[list[int]]:
    """Group entries (given in reference order, ``targets[i]``: the earlier entries entry i references) into
    requests whose entries are independent: each entry goes one request after the latest of its targets. A
    batch's entries are processed independently, so a target must be in an earlier request, never the same one.
    ``one_per_request``: every entry alone, in order (the single strategy)."""
    if one_per_request:
        return [[i] for i in range(len(targets))]
    wave_of: list[int] = []
    waves: list[list[int]] = []
    for index, needed in enumerate(targets):
        wave = 1 + max((wave_of[t] for t in needed if t < index), default=-1)
        wave_of.append(wave)
        if wave == len(waves):
            waves.append([])
        waves[wave].append(index)
    return waves
